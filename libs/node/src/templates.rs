//! Which root filesystem a template name means right now: read from the metadata database
//! the template-builder publishes to (read only; a node never writes templates).

use nanobox_core::{TemplateName, TemplateState};
use nanobox_store::{MetadataStore, ObjectKey};

use crate::NodeError;

/// A READY template, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTemplate {
    pub name: TemplateName,
    /// The image manifest digest.
    pub digest: String,
    /// The root filesystem object.
    pub rootfs_key: ObjectKey,
}

/// Resolves template names.
#[derive(Debug, Clone)]
pub struct Templates {
    meta: MetadataStore,
}

fn unavailable(e: &nanobox_store::MetadataError) -> NodeError {
    NodeError::Unavailable {
        context: "reading templates",
        message: crate::describe(e),
    }
}

impl Templates {
    pub fn new(meta: MetadataStore) -> Self {
        Self { meta }
    }

    /// The template `name` if it is READY; NOT_FOUND if it never was, FAILED_PRECONDITION
    /// (naming the warmup state) while its first warmup runs or after it failed. When the
    /// caller pins a digest (`expected_digest`), a template now at another digest is
    /// refused too: the scheduler placed the sandbox for that image.
    pub async fn resolve(
        &self,
        name: &TemplateName,
        expected_digest: Option<&str>,
    ) -> Result<ResolvedTemplate, NodeError> {
        let template = self
            .meta
            .get_template(name)
            .await
            .map_err(|e| unavailable(&e))?;
        let Some(template) = template else {
            let task = self
                .meta
                .latest_task(name)
                .await
                .map_err(|e| unavailable(&e))?;
            return Err(match task {
                Some(task) if task.state != TemplateState::Ready => {
                    NodeError::FailedPrecondition(match task.message {
                        Some(message) => format!(
                            "template {name} is not ready (its warmup {}: {message})",
                            task.state
                        ),
                        None => format!(
                            "template {name} is not ready (its warmup is {})",
                            task.state
                        ),
                    })
                }
                _ => NodeError::not_found("template", name),
            });
        };
        if template.state != TemplateState::Ready {
            return Err(NodeError::FailedPrecondition(format!(
                "template {name} is not ready ({})",
                template.state
            )));
        }
        let (Some(digest), Some(key)) = (template.manifest_digest, template.rootfs_key) else {
            return Err(NodeError::Internal(format!(
                "template {name} is READY without a root filesystem"
            )));
        };
        if let Some(expected) = expected_digest.filter(|d| !d.is_empty()) {
            if expected != digest {
                return Err(NodeError::FailedPrecondition(format!(
                    "template {name} is now at {digest}, not the requested {expected}"
                )));
            }
        }
        let rootfs_key = ObjectKey::new(key).map_err(|e| NodeError::Internal(e.to_string()))?;
        Ok(ResolvedTemplate {
            name: name.clone(),
            digest,
            rootfs_key,
        })
    }
}
