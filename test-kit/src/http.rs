//! A minimal HTTP/1.1 client: enough for `/readyz`, `/metrics` and the
//! demo's order service, without an HTTP client dependency.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `method path` (with a JSON `body`, if any) to `addr` and reads the
/// whole response: (status code, body).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(request_text("HTTP/1.1", &addr.to_string(), method, path, body).as_bytes())
        .await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    parse_response(&text)
}

/// A blocking GET of `path` on 127.0.0.1:`port`, for code outside a
/// runtime: (status code, body).
pub fn get_blocking(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(request_text("HTTP/1.0", "localhost", "GET", path, None).as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    parse_response(&text)
}

/// HTTP/1.0 for the blocking GET: the server then never answers chunked.
fn request_text(version: &str, host: &str, method: &str, path: &str, body: Option<&str>) -> String {
    let body = body.unwrap_or("");
    format!(
        "{method} {path} {version}\r\nHost: {host}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn parse_response(text: &str) -> anyhow::Result<(u16, String)> {
    let status = text
        .split_whitespace()
        .nth(1)
        .context("no HTTP status line")?
        .parse()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
