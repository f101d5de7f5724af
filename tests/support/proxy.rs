//! A TCP fault proxy for tests: listens on 127.0.0.1:0 and forwards every
//! connection to a target, with a fault mode that can be switched at runtime.
//!
//! | mode | existing connections | new connections |
//! |---|---|---|
//! | `Pass` | forwarded | accepted and forwarded |
//! | `Cut` | closed at once (then the mode is `Pass` again) | accepted and forwarded |
//! | `Stall` | kept open, nothing forwarded (bytes are held, not dropped) | accepted, nothing forwarded |
//! | `Slow(d)` | each chunk forwarded after `d` | same |
//! | `Refuse` | left alone | accepted and closed at once |
//!
//! `Refuse` leaves established connections alone: combine it with `cut()` for
//! "the service is gone" (`proxy.refuse_and_cut()`). Leaving `Stall` lets the
//! held bytes through, unless the peers gave up in the meantime. Dropping the
//! proxy closes its listener and every connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Cut,
    Stall,
    Slow(Duration),
    Refuse,
}

#[derive(Debug, Clone, Copy)]
struct State {
    mode: Mode,
    /// Bumped by every cut: a connection opened in an older epoch closes.
    epoch: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    forwarded_bytes: AtomicU64,
}

pub struct Proxy {
    pub port: u16,
    pub target: SocketAddr,
    state: watch::Sender<State>,
    counters: Arc<Counters>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding 127.0.0.1:<ephemeral port> to `target` (which need
    /// not be listening yet: until it is, connections are closed at once).
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let (state, rx) = watch::channel(State {
            mode: Mode::Pass,
            epoch: 0,
        });
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let now = *rx.borrow();
                if now.mode == Mode::Refuse {
                    c.refused.fetch_add(1, Ordering::Relaxed);
                    drop(client);
                    continue;
                }
                c.accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(connection(client, target, rx.clone(), now.epoch, c.clone()));
            }
        });
        Proxy {
            port,
            target,
            state,
            counters,
            accept_task,
        }
    }

    /// `host:port` of the proxy.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn mode(&self) -> Mode {
        self.state.borrow().mode
    }

    /// Switches the mode; `Mode::Cut` closes every open connection and then
    /// behaves as `Pass`.
    pub fn set_mode(&self, mode: Mode) {
        self.state.send_modify(|s| {
            if mode == Mode::Cut {
                s.epoch += 1;
                s.mode = Mode::Pass;
            } else {
                s.mode = mode;
            }
        });
    }

    /// Closes every open connection now; the mode stays as it is.
    pub fn cut(&self) {
        self.state.send_modify(|s| s.epoch += 1);
    }

    /// The service is gone: new connections are refused and open ones cut.
    pub fn refuse_and_cut(&self) {
        self.state.send_modify(|s| {
            s.mode = Mode::Refuse;
            s.epoch += 1;
        });
    }

    /// Connections accepted and forwarded (not refused) so far.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::Relaxed)
    }

    /// Connections closed at once because the mode was `Refuse`.
    pub fn refused(&self) -> u64 {
        self.counters.refused.load(Ordering::Relaxed)
    }

    pub fn forwarded_bytes(&self) -> u64 {
        self.counters.forwarded_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        // Every connection task ends when it sees a newer epoch.
        self.state.send_modify(|s| s.epoch = u64::MAX);
    }
}

/// Resolves once the connection's epoch is over (cut, or the proxy dropped).
async fn cut_signal(rx: &mut watch::Receiver<State>, epoch: u64) {
    loop {
        if rx.borrow_and_update().epoch != epoch {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn connection(
    client: TcpStream,
    target: SocketAddr,
    mut rx: watch::Receiver<State>,
    epoch: u64,
    counters: Arc<Counters>,
) {
    let upstream = tokio::select! {
        r = TcpStream::connect(target) => match r {
            Ok(s) => s,
            Err(_) => return,
        },
        _ = cut_signal(&mut rx, epoch) => return,
    };
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = pump(cr, uw, rx.clone(), epoch, counters.clone());
    let down = pump(ur, cw, rx.clone(), epoch, counters);
    let mut both = tokio::spawn(async move {
        tokio::join!(up, down);
    });
    tokio::select! {
        _ = &mut both => {}
        _ = cut_signal(&mut rx, epoch) => {
            both.abort();
        }
    }
}

/// Copies one direction chunk by chunk, applying the mode before each write.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: watch::Receiver<State>,
    epoch: u64,
    counters: Arc<Counters>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Hold the chunk while stalled; delay it while slow.
        loop {
            let s = *rx.borrow_and_update();
            if s.epoch != epoch {
                return;
            }
            match s.mode {
                Mode::Pass | Mode::Cut | Mode::Refuse => break,
                Mode::Slow(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Mode::Stall => {
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        counters
            .forwarded_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
}
