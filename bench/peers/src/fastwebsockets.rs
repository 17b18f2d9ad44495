//! fastwebsockets echo server on a current-thread runtime: the upgrade through hyper
//! (`fastwebsockets::upgrade`, the library's server path), then frames through a
//! `FragmentCollector` (fragmented messages are echoed whole), pongs and the close
//! handshake left to the library's defaults.

mod common;

use fastwebsockets::{upgrade, FragmentCollector, OpCode, WebSocketError};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

fn main() {
    let args = common::Args::parse();
    common::runtime().block_on(async move {
        let listener = common::listen(args.addr).await;
        loop {
            let stream = common::accept(&listener).await;
            tokio::spawn(async move {
                let http =
                    http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(on_request));
                let _ = http.with_upgrades().await;
            });
        }
    });
}

/// Any path: answer the upgrade, and echo on the upgraded connection.
async fn on_request(mut request: Request<Incoming>) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, upgraded) = upgrade::upgrade(&mut request)?;
    tokio::spawn(async move {
        let Ok(ws) = upgraded.await else { return };
        let mut ws = FragmentCollector::new(ws);
        while let Ok(frame) = ws.read_frame().await {
            let over = match frame.opcode {
                OpCode::Close => true,
                OpCode::Text | OpCode::Binary => ws.write_frame(frame).await.is_err(),
                _ => false,
            };
            if over {
                break;
            }
        }
    });
    Ok(response)
}
