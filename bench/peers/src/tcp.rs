//! A plain TCP echo, no WebSocket at all: whatever arrives goes back as it came. The
//! ceiling no WebSocket server can beat on this machine (the bench speaks to it with
//! `--raw`: the upgrade request and the masked frames come back byte for byte).
//!
//! Reads go through one buffer per thread after readiness, so an idle connection holds
//! no buffer; bytes the socket does not take at once wait in a buffer of their own.

mod common;

use std::cell::RefCell;
use std::io;

use tokio::net::TcpStream;

thread_local! {
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; 64 * 1024]);
}

fn main() {
    let args = common::Args::parse();
    common::runtime().block_on(async move {
        let listener = common::listen(args.addr).await;
        loop {
            let stream = common::accept(&listener).await;
            tokio::spawn(async move {
                let _ = echo(stream).await;
            });
        }
    });
}

async fn echo(stream: TcpStream) -> io::Result<()> {
    let mut pending: Vec<u8> = Vec::new();
    loop {
        if !pending.is_empty() {
            stream.writable().await?;
            match stream.try_write(&pending) {
                Ok(n) => drop(pending.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if !pending.is_empty() {
                continue;
            }
            pending = Vec::new();
        }
        stream.readable().await?;
        let done = BUF.with(|buf| -> io::Result<bool> {
            let mut buf = buf.borrow_mut();
            let n = match stream.try_read(&mut buf) {
                Ok(0) => return Ok(true),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            let sent = match stream.try_write(&buf[..n]) {
                Ok(sent) => sent,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            pending.extend_from_slice(&buf[sent..n]);
            Ok(false)
        })?;
        if done {
            return Ok(());
        }
    }
}
