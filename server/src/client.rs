//! A small client for the server's own API, used by the admin subcommands.

use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Calling the API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached.
    #[error("cannot reach the NovaCron API at {addr}; is `novacron-server run` running?")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The server answered with an error.
    #[error("the API refused the request ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// The reply was not what the API promises.
    #[error("unexpected reply from the API: {0}")]
    Reply(String),
}

/// Calls `method path` with an optional JSON body; returns the JSON reply.
pub async fn call(
    addr: SocketAddr,
    token: &str,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, ClientError> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .map_err(|e| ClientError::Reply(e.to_string()))?;
    let resp = client
        .request(req)
        .await
        .map_err(|source| ClientError::Connect { addr, source })?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Reply(e.to_string()))?
        .to_bytes();
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Reply(e.to_string()))?;
    if !status.is_success() {
        let message = v["error"]["message"].as_str().unwrap_or("no message").to_string();
        return Err(ClientError::Refused {
            status: status.as_u16(),
            message,
        });
    }
    Ok(v)
}
