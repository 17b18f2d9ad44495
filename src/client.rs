//! `ringpush connect URL`: a line-oriented WebSocket client for trying a server by hand.
//! Every text frame received is printed on its own line; every line typed is sent as one
//! text frame. Pings are answered. Not used by the server.

use std::io::{self, BufRead, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::Duration;

use tungstenite::{client::IntoClientRequest, Message};

/// Connects to `url` (ws:// only) and relays stdin and stdout until either side ends.
pub fn talk(url: &str) -> Result<(), String> {
    let request = url.into_client_request().map_err(|e| format!("bad URL {url:?}: {e}"))?;
    let uri = request.uri();
    if uri.scheme_str() != Some("ws") {
        return Err("only ws:// URLs are supported (put TLS in front with nginx, see tuning/nginx)".into());
    }
    let host = uri.host().ok_or("URL has no host")?.trim_matches(['[', ']']).to_string();
    let port = uri.port_u16().unwrap_or(80);
    let stream =
        TcpStream::connect((host.as_str(), port)).map_err(|e| format!("connect {host}:{port}: {e}"))?;
    let (mut ws, _) = tungstenite::client(request, stream).map_err(|e| format!("upgrade refused: {e}"))?;
    ws.get_mut().set_read_timeout(Some(Duration::from_millis(50))).map_err(|e| e.to_string())?;

    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut out = io::stdout();
    loop {
        match ws.read() {
            Ok(Message::Text(text)) => {
                let _ = writeln!(out, "{text}");
            }
            Ok(Message::Close(frame)) => {
                let _ = writeln!(out, "closed: {frame:?}");
                return Ok(());
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(tungstenite::Error::ConnectionClosed) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
        loop {
            match lines.try_recv() {
                Ok(line) if line.trim().is_empty() => {}
                Ok(line) => ws.send(Message::text(line)).map_err(|e| e.to_string())?,
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    let _ = ws.close(None);
                    let _ = ws.flush();
                    return Ok(());
                }
            }
        }
    }
}
