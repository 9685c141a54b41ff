//! What the balancer knows of each storage node's health, from the outcome of its calls.
//!
//! A server is "up" until a call to it fails, then "down" until a call succeeds again. The
//! last failure is kept as text so that `stats()` can tell an operator why.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::rpc::client::CallError;

pub struct Health {
    up: Vec<AtomicBool>,
    last_error: Vec<Mutex<Option<String>>>,
}

impl Health {
    pub fn new(servers: usize) -> Self {
        Health {
            up: (0..servers).map(|_| AtomicBool::new(true)).collect(),
            last_error: (0..servers).map(|_| Mutex::new(None)).collect(),
        }
    }

    pub fn mark_up(&self, server: usize) {
        self.up[server].store(true, Ordering::Relaxed);
    }

    pub fn mark_down(&self, server: usize, error: &CallError) {
        self.up[server].store(false, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error[server].lock() {
            *last = Some(error.to_string());
        }
    }

    pub fn state(&self, server: usize) -> &'static str {
        if self.up[server].load(Ordering::Relaxed) {
            "up"
        } else {
            "down"
        }
    }

    pub fn last_error(&self, server: usize) -> Option<String> {
        self.last_error[server]
            .lock()
            .ok()
            .and_then(|last| last.clone())
    }
}
