//! What every API handler takes apart first: the caller (authorized for a
//! scope), a MAC in the path, a JSON body; and how blocking store work is
//! run off the async threads. Shared by the API's modules.

use std::sync::Arc;

use axum::http::StatusCode;

use super::auth::{authorize, Caller};
use super::{ApiError, PanelState};
use crate::proto::Mac;
use crate::store::Scope;

type ApiResult<T> = Result<T, ApiError>;

pub fn parse_mac(text: &str) -> ApiResult<Mac> {
    Mac::parse(text).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Runs blocking store work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

/// The caller of a request, authorized for at least scope `S` (see
/// [`Reader`], [`Assigner`], [`Admin`]); a handler that takes one refuses
/// unauthenticated, unauthorized and CSRF-less requests before it runs.
pub struct Auth<const S: u8>(pub Caller);

/// Any authenticated caller.
pub type Reader = Auth<0>;
/// A caller who may assign images and adopt machines.
pub type Assigner = Auth<1>;
/// A caller who may change images, pools, users, tokens and settings.
pub type Admin = Auth<2>;

impl<const S: u8> axum::extract::FromRequestParts<Arc<PanelState>> for Auth<S> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<PanelState>,
    ) -> Result<Self, ApiError> {
        let required = match S {
            0 => Scope::Read,
            1 => Scope::Assign,
            _ => Scope::Admin,
        };
        let state = Arc::clone(state);
        let headers = parts.headers.clone();
        let method = parts.method.clone();
        blocking(move || authorize(&*state.store, &headers, &method, required))
            .await
            .map(Auth)
    }
}

pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("request body: {e}"),
        )
    })
}
