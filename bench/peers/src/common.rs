//! What every peer shares: its command line, the listening line the bench waits for, and
//! the single-threaded runtime. Every peer serves on one thread; `bench/compare.sh` pins
//! the process to one CPU with `taskset`, as it pins ringpush with `shards = 1`.

use std::net::SocketAddr;

/// `--addr HOST:PORT` (default 127.0.0.1:0) and `--read-buffer BYTES` (peers that have one).
pub struct Args {
    pub addr: SocketAddr,
    pub read_buffer: Option<usize>,
}

impl Args {
    pub fn parse() -> Args {
        let mut args = Args { addr: SocketAddr::from(([127, 0, 0, 1], 0)), read_buffer: None };
        let mut words = std::env::args().skip(1);
        while let Some(word) = words.next() {
            let value = words.next().unwrap_or_else(|| usage(&format!("{word} needs a value")));
            match word.as_str() {
                "--addr" => args.addr = value.parse().unwrap_or_else(|_| usage("--addr HOST:PORT")),
                "--read-buffer" => {
                    args.read_buffer = Some(value.parse().unwrap_or_else(|_| usage("--read-buffer BYTES")))
                }
                _ => usage(&format!("unknown option {word}")),
            }
        }
        args
    }
}

fn usage(why: &str) -> ! {
    eprintln!("{why}\nusage: {} [--addr HOST:PORT] [--read-buffer BYTES]", env!("CARGO_PKG_NAME"));
    std::process::exit(2)
}

/// A tokio runtime on the calling thread only (no worker threads, no blocking pool used).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_io().build().expect("a tokio runtime")
}

/// Binds, then prints `listening ADDR` on stdout: the line the bench reads the port from.
pub async fn listen(addr: SocketAddr) -> tokio::net::TcpListener {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap_or_else(|e| {
        eprintln!("bind {addr}: {e}");
        std::process::exit(1)
    });
    let local = listener.local_addr().expect("a bound address");
    println!("listening {local}");
    listener
}

/// Accepts forever; an accept error (out of descriptors, say) is logged and the loop goes
/// on, as a server in production would.
pub async fn accept(listener: &tokio::net::TcpListener) -> tokio::net::TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // As ringpush and the Node `ws` package do: small frames go out at once.
                let _ = stream.set_nodelay(true);
                return stream;
            }
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::task::yield_now().await;
            }
        }
    }
}
