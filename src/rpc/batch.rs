//! Replica operations on the wire: a batch of them in one HTTP request to
//! [`messages::BATCH_PATH`], each with the moment its sender stops waiting for it, translated
//! into the receiving node's clock ([`crate::clock`]); the node answers one reply per
//! operation, in order. Who batches what, and when, is the sender's business (the balancer's
//! per-node queues, a node's hint handoff).

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

use crate::clock;
use crate::rpc::client::{CallError, RpcClient};
use crate::rpc::messages::{self, Op, OpReply};

/// An operation as it goes on the wire: encodes as a [`messages::Envelope`] without copying
/// the operation (values can be large).
#[derive(Serialize)]
struct EnvelopeRef<'a> {
    deadline_us: u64,
    op: &'a Op,
}

/// Sends `ops` to the node at `address` as one batch, each with the moment its sender stops
/// waiting for it (this machine's clock, microseconds since the epoch), which the node gets
/// translated into its own clock; the node's answer to each, in order.
pub async fn send_batch(
    client: &RpcClient,
    address: &str,
    ops: &[(&Op, u64)],
    timeout: Duration,
) -> Result<Vec<OpReply>, CallError> {
    let offset = client.clocks().offset(address);
    let envelopes: Vec<EnvelopeRef<'_>> = ops
        .iter()
        .map(|&(op, deadline_us)| EnvelopeRef {
            deadline_us: clock::remote_deadline_us(deadline_us, offset),
            op,
        })
        .collect();
    let body = postcard::to_allocvec(&envelopes)
        .map_err(|_| CallError::Refused("batch could not be encoded".into()))?;
    let reply = client
        .post_bytes(address, messages::BATCH_PATH, Bytes::from(body), timeout)
        .await?;
    let answers: Vec<OpReply> = postcard::from_bytes(&reply)
        .map_err(|_| CallError::BadResponse("batch reply could not be decoded".into()))?;
    if answers.len() == ops.len() {
        Ok(answers)
    } else {
        Err(CallError::BadResponse(
            "batch reply has the wrong length".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::test_node::{fake_node_with_clock, read};

    /// Deadlines travel in the node's clock: widened by a second for a node never measured,
    /// then moved by the offset its answers showed (here, an hour ahead).
    #[tokio::test]
    async fn deadlines_travel_in_the_node_clock() {
        const HOUR_US: u64 = 3_600_000_000;
        let node = fake_node_with_clock(
            |ops| vec![OpReply::Siblings(crate::version::Siblings::new()); ops.len()],
            Some(HOUR_US),
        );
        let client = RpcClient::new();
        let op = read("a");
        let deadline = clock::now_us() + 1_000_000;
        let ops = [(&op, deadline)];
        let send = || send_batch(&client, &node.address, &ops, Duration::from_secs(5));
        send().await.expect("answered");
        let offset = client.clocks().offset(&node.address).expect("measured");
        send().await.expect("answered");
        let seen = node.deadlines.lock().expect("deadlines").clone();
        assert_eq!(seen[0], deadline + clock::UNMEASURED_SKEW_US);
        assert!(
            offset.offset_us.abs_diff(HOUR_US as i64) < 1_000_000,
            "{offset:?}"
        );
        assert_eq!(
            seen[1],
            clock::remote_deadline_us(deadline, Some(offset)),
            "translated by the estimate"
        );
        assert!(seen[1] > deadline + HOUR_US);
    }
}
