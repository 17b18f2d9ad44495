//! What a run saw, as the clients saw it: every connection's events in order, with the
//! time each happened (milliseconds since the start of the run, on one clock), and the
//! director's calls with the times they were made and answered.

use std::sync::Mutex;
use std::time::Instant;

use serde_json::Value;

use super::plan::ConnPlan;

/// Milliseconds since the start of the run.
pub type Ms = f64;

pub struct Clock(Instant);

impl Clock {
    pub fn start() -> Clock {
        Clock(Instant::now())
    }

    pub fn now(&self) -> Ms {
        self.0.elapsed().as_secs_f64() * 1000.0
    }
}

/// One thing a connection did or got.
#[derive(Clone, Debug)]
pub enum Ev {
    /// The client starts its TCP connect.
    Connect,
    /// The upgrade did not succeed (node down, refused); the device tries again later.
    Refused(String),
    /// A JSON text frame from the server (`hello` included).
    Frame(Value),
    /// The server's close frame, with its code.
    Close(u16),
    /// The stream ended (EOF, reset, or an error).
    Eof(String),
    Sent {
        conv: String,
        cid: String,
        body: Value,
    },
    Synced {
        conv: String,
        after: u64,
    },
    /// The client stops reading and goes (its last event).
    End(&'static str),
}

/// One connection's whole life.
#[derive(Clone, Debug)]
pub struct ConnLog {
    pub id: usize,
    pub user: String,
    pub device: String,
    pub plan: ConnPlan,
    /// The connection lived through the end of the run and was drained: everything owed
    /// to it must have arrived.
    pub survived: bool,
    pub events: Vec<(Ms, Ev)>,
}

impl ConnLog {
    pub fn hello_at(&self) -> Option<Ms> {
        self.events.iter().find_map(|(t, e)| match e {
            Ev::Frame(v) if v["op"] == "hello" => Some(*t),
            _ => None,
        })
    }

    pub fn connect_at(&self) -> Ms {
        self.events.first().map_or(0.0, |(t, _)| *t)
    }

    pub fn end_at(&self) -> Ms {
        self.events.last().map_or(0.0, |(t, _)| *t)
    }

    /// The close code the server sent, if it sent one.
    pub fn closed_with(&self) -> Option<u16> {
        self.events.iter().find_map(|(_, e)| match e {
            Ev::Close(code) => Some(*code),
            _ => None,
        })
    }
}

/// A call of the director, made at `at` and answered at `done`.
#[derive(Clone, Debug)]
pub struct Call {
    pub at: Ms,
    pub done: Ms,
    pub what: Done,
}

#[derive(Clone, Debug)]
pub enum Done {
    /// A push (`users`) or broadcast (`None`) whose body carries `k`, accepted (202) by
    /// node `via` (`None`: by none).
    Push { k: u64, users: Option<Vec<String>>, via: Option<usize> },
    /// A message posted through the API; `seq` when it was accepted.
    Post { conv: String, body: Value, seq: Option<u64> },
    /// A membership change; `ok`: it was applied (200). One that failed may or may not
    /// have been.
    Member { conv: String, user: String, join: bool, ok: bool },
    /// A fault injected into the cluster, from `at` to `done`.
    Fault(String),
}

/// Everything recorded, shared by the run's threads.
#[derive(Default)]
pub struct Record {
    pub conns: Mutex<Vec<ConnLog>>,
    pub calls: Mutex<Vec<Call>>,
}

impl Record {
    pub fn conn(&self, log: ConnLog) {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).push(log);
    }

    pub fn call(&self, call: Call) {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).push(call);
    }
}
