//! The one error type of the bench library (the binary wraps it in anyhow).

use fabric::client::ClientError;
use fabric::node::NodeError;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("node: {0}")]
    Node(#[from] NodeError),
    #[error("client: {0}")]
    Client(#[from] ClientError),
    #[error("websocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("histogram: {0}")]
    Histogram(String),
    #[error("invalid options: {0}")]
    Options(String),
    #[error("nats: {0}")]
    Nats(String),
    #[error("chart: {0}")]
    Chart(String),
}
