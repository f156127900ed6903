//! Errors setting the gateway up: the descriptor set, the HTTP rules in it, the upstream
//! endpoints. (Errors answering a request are [`crate::ApiError`]s.)

/// Something in the descriptors or the configuration keeps the gateway from starting.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The encoded descriptor set does not decode.
    #[error("the descriptor set does not decode: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    /// The descriptor set lacks `google.api.http` (the protos were compiled without
    /// `google/api/annotations.proto`).
    #[error("the descriptor set has no google.api.http extension")]
    NoHttpExtension,
    /// An `HttpRule` option does not decode.
    #[error("{method}: the google.api.http option does not decode: {source}")]
    Rule {
        /// The method's full name.
        method: String,
        /// Why.
        source: prost::DecodeError,
    },
    /// A path template breaks the grammar.
    #[error("path template `{template}`: {message}")]
    Template {
        /// The template.
        template: String,
        /// What is wrong.
        message: String,
    },
    /// A rule that cannot be served: a missing field, a client-streaming method, a clash.
    #[error("{method}: {message}")]
    Binding {
        /// The method's full name.
        method: String,
        /// What is wrong.
        message: String,
    },
    /// A service has HTTP rules but no upstream to send its calls to.
    #[error("{service} has HTTP rules but no upstream is configured for it")]
    NoUpstream {
        /// The service's full name.
        service: String,
    },
    /// An upstream endpoint is not a valid URI.
    #[error("upstream {name}: `{endpoint}` is not a valid endpoint: {message}")]
    Endpoint {
        /// Which upstream.
        name: String,
        /// The endpoint as configured.
        endpoint: String,
        /// Why.
        message: String,
    },
}
