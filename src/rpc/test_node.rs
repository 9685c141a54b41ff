//! A stand-in storage node for the tests of what talks to nodes: a plain socket that answers
//! every batch as the test says, and records what it received.

use std::sync::Arc;
use std::time::Duration;

use crate::clock;
use crate::rpc::messages::{self, Op, OpReply, ReadRequest};

/// A read of `key`'s own copy.
pub fn read(key: &str) -> Op {
    Op::Read(ReadRequest {
        key: key.into(),
        hint_for: None,
    })
}

/// The address of a peer that accepts connections and never answers (like a process under
/// SIGSTOP): it holds every connection, reading nothing.
pub fn silent_peer() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    address
}

/// A stand-in node on a plain socket: answers each batch with `answer` (which may take its
/// time; connections are served side by side) and records the batches' sizes.
pub fn fake_node(answer: fn(&[Op]) -> Vec<OpReply>) -> FakeNode {
    fake_node_with_clock(answer, None)
}

/// As [`fake_node`], answering with a clock header `ahead_us` ahead of this machine's
/// (none when `None`), and recording the deadlines the batches carry.
pub fn fake_node_with_clock(answer: fn(&[Op]) -> Vec<OpReply>, ahead_us: Option<u64>) -> FakeNode {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let node = FakeNode {
        address: listener.local_addr().expect("address").to_string(),
        sizes: Arc::default(),
        busy: Arc::default(),
        deadlines: Arc::default(),
    };
    let (seen, busy, deadlines) = (
        node.sizes.clone(),
        node.busy.clone(),
        node.deadlines.clone(),
    );
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (seen, busy, deadlines) = (seen.clone(), busy.clone(), deadlines.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut writer = stream;
                'requests: loop {
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            break 'requests;
                        }
                        let line = line.trim_end().to_ascii_lowercase();
                        if line.is_empty() {
                            break;
                        }
                        if let Some(value) = line.strip_prefix("content-length:") {
                            length = value.trim().parse().expect("length");
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).expect("body");
                    let envelopes: Vec<messages::Envelope> =
                        postcard::from_bytes(&body).expect("a batch");
                    let received_us = clock::now_us() + ahead_us.unwrap_or(0);
                    deadlines
                        .lock()
                        .expect("deadlines")
                        .extend(envelopes.iter().map(|e| e.deadline_us));
                    let ops: Vec<Op> = envelopes.into_iter().map(|e| e.op).collect();
                    seen.lock().expect("sizes").push(ops.len());
                    busy.lock().expect("busy").begin();
                    let reply = postcard::to_allocvec(&answer(&ops)).expect("reply");
                    busy.lock().expect("busy").end();
                    let clock_header = match ahead_us {
                        Some(ahead) => format!(
                            "{}: {received_us},{}\r\n",
                            clock::CLOCK_HEADER,
                            clock::now_us() + ahead
                        ),
                        None => String::new(),
                    };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{clock_header}\r\n",
                        reply.len()
                    );
                    writer.write_all(head.as_bytes()).expect("head");
                    writer.write_all(&reply).expect("reply");
                }
            });
        }
    });
    node
}

pub struct FakeNode {
    pub address: String,
    /// The size of each batch received, in order.
    pub sizes: Arc<std::sync::Mutex<Vec<usize>>>,
    pub busy: Arc<std::sync::Mutex<Busy>>,
    /// The deadline of every operation received, in order.
    pub deadlines: Arc<std::sync::Mutex<Vec<u64>>>,
}

/// Batches being answered at once: now, and the most so far.
#[derive(Default)]
pub struct Busy {
    pub now: usize,
    pub most: usize,
}

impl Busy {
    fn begin(&mut self) {
        self.now += 1;
        self.most = self.most.max(self.now);
    }

    fn end(&mut self) {
        self.now -= 1;
    }
}

impl FakeNode {
    pub fn batches(&self) -> usize {
        self.sizes.lock().expect("sizes").len()
    }

    /// Waits (up to 10 s) until the node has received `count` batches.
    pub async fn received(&self, count: usize) {
        for _ in 0..1000 {
            if self.batches() >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the node received {} batches, not {count}", self.batches());
    }
}
