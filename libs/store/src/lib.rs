//! Storage for the NanoBox services: an object store for large immutable blobs (template
//! root filesystems and their sidecars; snapshots once the snapshot store exists, issue
//! 12) and a Postgres metadata store for the small mutable records that describe them.
//!
//! [`ObjectStore`] is the seam for blobs, with two implementations: [`LocalFsStore`] (a
//! directory; the embedded default for a single machine) and [`S3Store`] (any S3-compatible
//! server). Both pass the same [`conformance`] suite. Keys are validated once, as
//! [`ObjectKey`], so no store ever sees a key that could escape its root.
//!
//! [`MetadataStore`] holds templates and warm-up tasks (written by the template-builder)
//! and nodes and sandboxes (written by the scheduler) in Postgres; its schema is versioned
//! by the embedded migrations under `migrations/`, applied whenever a service opens it
//! (the scheduler, the template-builder and the node agents; issue 11 takes the node
//! agents off the database).

#![forbid(unsafe_code)]

pub mod conformance;
mod digest;
mod error;
mod key;
mod local;
mod location;
pub mod metadata;
mod object;
pub mod rootfs;
mod s3;

pub use digest::{get_file_verified, sha256_file, sha256_hex};
pub use error::StoreError;
pub use key::{ObjectKey, MAX_KEY_LEN, MAX_SEGMENT_LEN};
pub use local::LocalFsStore;
pub use location::open_object_store;
pub use metadata::{MetadataError, MetadataStore, RootfsLock};
pub use object::{ObjectMeta, ObjectStore, ObjectSummary, MAX_RANGE_LEN};
pub use s3::{S3Config, S3Credentials, S3Store};
