//! Calls to the bootfleet panel's API, for `storm --power-via`: setting
//! the simulated machines' BMCs, asking for the power-on, checking in.
//!
//! One request per connection (`Connection: close`), written by hand on a
//! tokio socket: the load tool's HTTP client (`http.rs`) only GETs files,
//! and a handful of JSON calls do not justify a second client crate.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `METHOD url` with an optional bearer token and JSON body; the status
/// and the JSON answer (`Null` when empty or not JSON).
pub async fn call(
    url: &str,
    method: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value)> {
    let parsed = url::Url::parse(url).with_context(|| format!("{url} is not a URL"))?;
    if parsed.scheme() != "http" {
        bail!("{url}: the load tool speaks plain http:// only");
    }
    let host = parsed.host_str().context("URL without a host")?;
    let port = parsed.port_or_known_default().unwrap_or(80);
    let path = match parsed.query() {
        Some(query) => format!("{}?{query}", parsed.path()),
        None => parsed.path().to_string(),
    };
    let mut stream = tokio::net::TcpStream::connect((host, port))
        .await
        .with_context(|| format!("cannot reach {host}:{port}"))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(&body);
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{method} {url}: no HTTP status in the answer"))?;
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .unwrap_or(Value::Null);
    Ok((status, json))
}
