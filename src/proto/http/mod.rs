//! HTTP, sans-I/O: [`request`] parses a request head (httparse) and
//! [`range`] plans the body of a response to a GET with or without `Range`
//! (RFC 9110 §14). The service that answers requests is
//! [`crate::server::http`]; the sockets are the engine's.

pub mod range;
pub mod request;
