//! HTTP, sans-I/O: [`request`] parses a request head (httparse),
//! [`range`] plans the body of a response to a GET with or without `Range`
//! (RFC 9110 §14), [`response`] frames a response head and evaluates
//! conditional requests (§13), and [`connection`] is one connection's state machine
//! (pipelining, the header, idle and send timeouts, how each piece of a
//! response goes out) that both HTTP engines drive. The service that
//! answers requests is [`crate::server::http`]; the sockets are the
//! engine's.

pub mod connection;
pub mod range;
pub mod request;
pub mod response;
