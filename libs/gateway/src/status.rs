//! What a failed REST call returns: a gRPC status code mapped to an HTTP status, with the
//! JSON body `{"code": "NOT_FOUND", "message": "..."}` (`code` is the gRPC code name).
//!
//! Every error the gateway produces, its own (bad JSON, no route, no key) and the upstream
//! services' (`tonic::Status`), goes through [`ApiError`], so clients see one error shape.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tonic::Code;

/// An error answer: a gRPC code, a message for the caller, and the HTTP status (normally
/// [`http_status`] of the code; a few gateway errors such as 405 and 413 have no gRPC code
/// of their own and override it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The gRPC code, reported by name in the body.
    pub code: Code,
    /// What went wrong, for the caller.
    pub message: String,
    /// The HTTP status to answer with.
    pub http: StatusCode,
}

impl ApiError {
    /// An error with the HTTP status that [`http_status`] maps `code` to.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            http: http_status(code),
        }
    }

    /// `INVALID_ARGUMENT` (400).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// The same error answered with another HTTP status.
    pub fn with_http(mut self, http: StatusCode) -> Self {
        self.http = http;
        self
    }

    /// The JSON body: `{"code": "...", "message": "..."}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "code": code_name(self.code), "message": self.message })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", code_name(self.code), self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        Self::new(status.code(), status.message())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.body().to_string().into_bytes();
        body.push(b'\n');
        let mut response = (self.http, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.code == Code::Unauthenticated {
            // RFC 6750: tell the client which scheme the API wants.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"nanobox\""),
            );
        }
        response
    }
}

/// The HTTP status for a gRPC code, as grpc-gateway maps them. `FAILED_PRECONDITION` is
/// 400 (the request cannot succeed until the caller changes something, as grpc-gateway and
/// Google's API design guide have it), not 409; `RESOURCE_EXHAUSTED` is 429.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => client_closed_request(),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// nginx's 499 "client closed request", which grpc-gateway uses for `CANCELLED`.
fn client_closed_request() -> StatusCode {
    // 499 is within 100..=999, so this cannot fail; 500 is only a fallback for the type.
    StatusCode::from_u16(499).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The canonical name of a gRPC code (`NOT_FOUND`), as in `google.rpc.Code`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_http_statuses() {
        let table = [
            (Code::InvalidArgument, 400),
            (Code::FailedPrecondition, 400),
            (Code::OutOfRange, 400),
            (Code::Unauthenticated, 401),
            (Code::PermissionDenied, 403),
            (Code::NotFound, 404),
            (Code::AlreadyExists, 409),
            (Code::Aborted, 409),
            (Code::ResourceExhausted, 429),
            (Code::Cancelled, 499),
            (Code::Unknown, 500),
            (Code::Internal, 500),
            (Code::DataLoss, 500),
            (Code::Unimplemented, 501),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
        ];
        for (code, http) in table {
            assert_eq!(http_status(code).as_u16(), http, "{code:?}");
        }
    }

    #[test]
    fn body_names_the_code() {
        let e = ApiError::from(tonic::Status::not_found("template x not found"));
        assert_eq!(e.http, StatusCode::NOT_FOUND);
        assert_eq!(
            e.body(),
            serde_json::json!({"code": "NOT_FOUND", "message": "template x not found"})
        );
        let response = ApiError::new(Code::Unauthenticated, "no key").into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
    }
}
