//! HTTP, sans-I/O. Today: [`range`], the plan of a response to a GET with
//! or without `Range` (RFC 9110 §14). The HTTP server that uses it arrives
//! with the HTTP/router issue.

pub mod range;
