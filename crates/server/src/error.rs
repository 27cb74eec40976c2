//! Every error leaves as JSON: `{"error": {"code": "...", "message": "..."}}` with a fitting status.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("this API key lacks the {0:?} scope")]
    Forbidden(&'static str),
    /// The scope is there for the route, not for what this request asks of it.
    #[error("{what} needs the {scope:?} scope, which this API key lacks")]
    ForbiddenHere { scope: &'static str, what: String },
    /// Serving without keys, a request that may come from a web page rather than from this machine.
    #[error("{0}")]
    NotLocal(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    #[error("request body too large: {0}")]
    PayloadTooLarge(String),
    /// The body did not arrive in time (`--body-timeout-secs`); sending it again may well work.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("rate limit exceeded; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("storage failed: {0}")]
    Store(#[from] safeguard_store::StoreError),
    #[error("{0}")]
    Unavailable(String),
    /// The model finished without an answer a client could read as one (no final message, or one the harmony
    /// parse refused). Never an empty success, which a client testing the content for "1" reads as safe.
    #[error("{0}")]
    NoAnswer(String),
}

impl ApiError {
    pub fn bad(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest { code, message: message.into() }
    }

    /// Refuses a NUL character in text a person wrote (a rationale, an appeal's reason): nobody types one, and
    /// PostgreSQL cannot store one, so it would fail only after the work (an appeal's reasoning) was paid for.
    pub fn refuse_nul(field: &str, text: &str) -> Result<(), ApiError> {
        if text.contains('\0') {
            return Err(ApiError::bad("invalid_text", format!("\"{field}\" contains a NUL character")));
        }
        Ok(())
    }

    /// A field that has two names (ours and OpenAI's: `effort` and `reasoning_effort`), null standing for absent
    /// as everywhere a body is read. Both given with different values is refused rather than one chosen.
    pub fn either_field<'a>(
        body: &'a serde_json::Value,
        ours: &str,
        alias: &str,
    ) -> Result<Option<&'a serde_json::Value>, ApiError> {
        let given = |field: &str| body.get(field).filter(|value| !value.is_null());
        match (given(ours), given(alias)) {
            (Some(a), Some(b)) if a != b => Err(ApiError::bad(
                "invalid_request",
                format!("\"{ours}\" and \"{alias}\" name the same setting; they differ ({a} and {b}), so give one"),
            )),
            (Some(value), _) | (None, Some(value)) => Ok(Some(value)),
            (None, None) => Ok(None),
        }
    }

    /// A boolean field of a request body, false when absent or null. Anything else is refused: `"appeal": "yes"`
    /// or `"return_reasoning": "true"` read as false would quietly do what the client did not ask.
    pub fn flag(body: &serde_json::Value, field: &str) -> Result<bool, ApiError> {
        match body.get(field) {
            None | Some(serde_json::Value::Null) => Ok(false),
            Some(serde_json::Value::Bool(value)) => Ok(*value),
            Some(other) => {
                Err(ApiError::bad("invalid_request", format!("\"{field}\" must be true or false, not {other}")))
            }
        }
    }

    /// Refuses a body with a field the route does not read. Ignored, a misspelt field (`"polices"`) or one another
    /// route reads (`"route": "cascade"` on a job, which always reasons directly) would have the request decided
    /// in a way its sender did not ask for, without a word.
    pub fn refuse_unknown_fields(body: &serde_json::Value, known: &[&[&str]]) -> Result<(), ApiError> {
        let Some(object) = body.as_object() else {
            return Ok(());
        };
        let known = || known.iter().flat_map(|fields| fields.iter().copied());
        // A null stands for a field left out, here as everywhere a body is read.
        let unknown =
            object.iter().find(|(field, value)| !value.is_null() && !known().any(|name| name == field.as_str()));
        match unknown.map(|(field, _)| field) {
            None => Ok(()),
            Some(field) => Err(ApiError::bad(
                "unknown_field",
                format!("this route does not read {field:?}; it reads {}", known().collect::<Vec<_>>().join(", ")),
            )),
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) | ApiError::ForbiddenHere { .. } => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotLocal(_) => (StatusCode::FORBIDDEN, "keyless_local_only"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage_error"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::NoAnswer(_) => (StatusCode::BAD_GATEWAY, "no_answer"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let body = Json(json!({"error": {"code": code, "message": self.to_string()}}));
        let mut response = (status, body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let ApiError::RateLimited { retry_after_secs } = self
            && let Ok(value) = HeaderValue::from_str(&retry_after_secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

/// Whether reading a request's body failed because it did not arrive in time ([`crate::http`]'s deadline).
pub(crate) fn body_timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(|e| e.is::<crate::http::BodyTimedOut>())
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        if body_timed_out(&rejection) {
            return ApiError::RequestTimeout(rejection.body_text());
        }
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(rejection.body_text())
        } else {
            ApiError::bad("invalid_json", rejection.body_text())
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::bad("invalid_query", rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::bad("invalid_path", rejection.body_text())
    }
}

/// `Path<T>` whose rejections (a segment that is not UTF-8 once decoded) are our JSON errors instead of plain text.
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// `Query<T>` whose rejections are our JSON errors instead of plain text.
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// `Json<T>` whose rejections are our JSON errors instead of plain text.
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);
