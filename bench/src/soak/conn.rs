//! A blocking WebSocket client connection for the soak's device and rogue threads: one
//! thread per connection, reads bounded by a timeout so the thread can act between frames.
//! Frames are whole (continuations joined); the soak's traffic is light, so clarity wins
//! over the epoll fleet's economy.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::ws::{self, Decoder, Event, HandshakeError, Header, Rng};

/// A frame from the server.
#[derive(Debug)]
pub enum Frame {
    Text(Vec<u8>),
    Binary,
    Ping(Vec<u8>),
    Pong,
    /// The server's close status (`None`: an empty close frame).
    Close(Option<u16>),
}

/// Why an upgrade did not happen.
#[derive(Debug)]
pub enum OpenError {
    /// The TCP connect, write or read failed (a node down or restarting).
    Io(io::Error),
    /// The server answered, but not with a valid 101 (`Status(503)`: throttled or draining).
    Handshake(HandshakeError),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Io(e) => write!(f, "{e}"),
            OpenError::Handshake(e) => write!(f, "{e}"),
        }
    }
}

pub struct Conn {
    stream: TcpStream,
    decoder: Decoder,
    /// Bytes read and not decoded yet.
    input: Vec<u8>,
    /// The header and payload of the frame being decoded.
    header: Option<Header>,
    payload: Vec<u8>,
    /// A fragmented data message being joined, and whether it is text.
    message: Vec<u8>,
    text: bool,
    rng: Rng,
    out: Vec<u8>,
    /// The reason of the last close frame read (PROTOCOL.md: a 1001's ends in
    /// `reconnect_after_ms=N`).
    close_reason: Vec<u8>,
}

impl Conn {
    /// Connects to `addr` and upgrades `target` (path and query), within `limit`.
    pub fn open(addr: SocketAddr, target: &str, limit: Duration) -> Result<Conn, OpenError> {
        Conn::open_or_retry_after(addr, target, limit).map_err(|(e, _)| e)
    }

    /// [`Conn::open`], and with a refusal the `Retry-After` it carried (seconds), if any.
    pub fn open_or_retry_after(
        addr: SocketAddr,
        target: &str,
        limit: Duration,
    ) -> Result<Conn, (OpenError, Option<u64>)> {
        let io = |e| (OpenError::Io(e), None);
        let deadline = Instant::now() + limit;
        let mut stream = TcpStream::connect_timeout(&addr, limit).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        let mut rng = Rng::from_entropy();
        let key = ws::new_key(&mut rng);
        let request = ws::upgrade_request(&addr.to_string(), target, &key);
        stream.set_write_timeout(Some(limit)).map_err(io)?;
        stream.write_all(request.as_bytes()).map_err(io)?;
        let mut input = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        let head = loop {
            match ws::check_response(&input, &key) {
                Ok(Some(n)) => break n,
                Ok(None) => {}
                Err(e) => return Err((OpenError::Handshake(e), ws::retry_after(&input))),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io(io::Error::new(io::ErrorKind::TimedOut, "no upgrade answer")));
            }
            stream.set_read_timeout(Some(left)).map_err(io)?;
            match stream.read(&mut chunk) {
                Ok(0) => return Err(io(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => input.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(io(e)),
            }
        };
        input.drain(..head);
        Ok(Conn {
            stream,
            decoder: Decoder::default(),
            input,
            header: None,
            payload: Vec::new(),
            message: Vec::new(),
            text: false,
            rng,
            out: Vec::new(),
            close_reason: Vec::new(),
        })
    }

    /// The reason text of the last close frame read.
    pub fn close_reason(&self) -> &[u8] {
        &self.close_reason
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Sets a `SOL_SOCKET` option (best effort: a test client's tuning).
    pub fn set_option<T>(&self, name: libc::c_int, value: &T) {
        // SAFETY: `value` is a live value of the option's own type, its size passed along;
        // the socket is ours.
        unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                value as *const T as *const libc::c_void,
                std::mem::size_of::<T>() as libc::socklen_t,
            );
        }
    }

    /// Writes one masked frame (blocking; bounded by the write timeout set at open).
    pub fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        self.out.clear();
        let mask = self.rng.mask();
        ws::write_frame(&mut self.out, opcode, payload, mask);
        self.stream.write_all(&self.out)
    }

    pub fn send_text(&mut self, text: &[u8]) -> io::Result<()> {
        self.send(ws::opcode::TEXT, text)
    }

    /// Sends a close frame with `code` and waits up to `limit` for the server's close
    /// (or EOF); the connection is done either way.
    pub fn close(mut self, code: u16, limit: Duration) {
        if self.send(ws::opcode::CLOSE, &code.to_be_bytes()).is_err() {
            return;
        }
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next(left) {
                Ok(Some(Frame::Close(_))) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// The next whole frame, or `Ok(None)` when `wait` passes without one. EOF and
    /// protocol errors are errors.
    pub fn next(&mut self, wait: Duration) -> io::Result<Option<Frame>> {
        let deadline = Instant::now() + wait;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(frame) = self.decode()? {
                return Ok(Some(frame));
            }
            // At least one short read, even when `wait` is zero.
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Decodes the buffered bytes up to the end of the next whole frame, if they hold one.
    fn decode(&mut self) -> io::Result<Option<Frame>> {
        let mut input = &self.input[..];
        let mut frame = None;
        while frame.is_none() {
            let event = self
                .decoder
                .next(&mut input)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            match event {
                None => break,
                Some(Event::Start(header)) => self.header = Some(header),
                Some(Event::Payload(piece)) => self.payload.extend_from_slice(piece),
                Some(Event::End) => {
                    let Some(header) = self.header.take() else { continue };
                    let payload = std::mem::take(&mut self.payload);
                    frame = match header.opcode {
                        ws::opcode::PING => Some(Frame::Ping(payload)),
                        ws::opcode::PONG => Some(Frame::Pong),
                        ws::opcode::CLOSE => {
                            self.close_reason = payload.get(2..).unwrap_or_default().to_vec();
                            Some(Frame::Close(
                                (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
                            ))
                        }
                        opcode => {
                            if opcode != ws::opcode::CONTINUATION {
                                self.message.clear();
                                self.text = opcode == ws::opcode::TEXT;
                            }
                            self.message.extend_from_slice(&payload);
                            match (header.fin, self.text) {
                                (false, _) => None,
                                (true, true) => Some(Frame::Text(std::mem::take(&mut self.message))),
                                (true, false) => Some(Frame::Binary),
                            }
                        }
                    };
                }
            }
        }
        let used = self.input.len() - input.len();
        self.input.drain(..used);
        Ok(frame)
    }
}
