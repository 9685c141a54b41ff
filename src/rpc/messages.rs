//! The internal messages between balancers and storage nodes, and between nodes.
//!
//! Replica operations ([`Op`]) travel in binary batches on [`BATCH_PATH`]: balancers send
//! them, and so does a node handing hints to their owner. Anti-entropy questions are XML-RPC
//! methods like any other (so `curl` can poke at them) carrying a single base64 parameter.
//! Either way keys and sibling sets travel byte-exact as postcard, with no XML escaping or
//! whitespace rules in between, and a node never parses the values it stores.

use dxr::Value;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::error::{Error, Result};
use crate::rpc::codec::Param;
use crate::version::{Dot, Siblings, VClock};

/// Anti-entropy: a question about the tree a node keeps for the asking peer.
pub const AAE: &str = "node.aae";
/// Merge many keys' sibling sets at once (anti-entropy push).
pub const MERGE_MANY: &str = "node.merge_many";
/// Read many keys' sibling sets at once (anti-entropy pull).
pub const READ_MANY: &str = "node.read_many";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoordinateRequest {
    pub key: String,
    /// The value's XML text; `None` writes a tombstone (delete).
    pub value: Option<String>,
    /// What the client had seen; `None` for a blind write, which supersedes the versions the
    /// node holds that are no newer than `entered_us`.
    pub context: Option<VClock>,
    /// When the client's request entered the cluster, on the coordinator's cluster clock
    /// ([`crate::clock`]), in microseconds: the new version's timestamp, stamped once and carried by every
    /// copy, hint and repair of it.
    pub entered_us: u64,
    /// Set when the node stands in for an unreachable replica (sloppy quorum): the owner's
    /// address, so the node keeps the write as a hint and hands it over later.
    pub hint_for: Option<String>,
}

impl CoordinateRequest {
    /// Bytes of the value the write carries (none for a delete).
    pub fn value_bytes(&self) -> usize {
        self.value.as_ref().map_or(0, String::len)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeRequest {
    pub key: String,
    pub siblings: Siblings,
    /// As in [`CoordinateRequest::hint_for`].
    pub hint_for: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadRequest {
    pub key: String,
    /// Read the hint held for this owner instead of the node's own copy.
    pub hint_for: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReapRequest {
    pub key: String,
    /// The tombstones' dots the balancer saw on every replica; the node reaps only if it holds
    /// exactly these.
    pub dots: Vec<Dot>,
}

/// Path of the binary batch endpoint balancers use on storage nodes (see [`Op`]).
pub const BATCH_PATH: &str = "/internal/batch";

/// One replica operation inside a batch. The balancer's hot path sends these, many per HTTP
/// request, as one postcard-encoded `Vec<Envelope>` to [`BATCH_PATH`]; the node answers a
/// `Vec<OpReply>` in the same order. Batching concurrent operations to one node amortises the
/// HTTP exchange and the syscalls over all of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    Coordinate(CoordinateRequest),
    Merge(MergeRequest),
    Read(ReadRequest),
    Reap(ReapRequest),
}

/// An operation as it travels: with the moment, on the *receiving* node's clock, after which
/// the node must refuse it unapplied ([`OpReply::Expired`]). It is when its sender stops
/// waiting for it, translated into the receiver's clock (see [`crate::clock`]): an operation
/// held up in a kernel's retransmit queue or behind a paused process must not act on state
/// written after its sender gave up on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Microseconds since the Unix epoch, receiver's clock.
    pub deadline_us: u64,
    pub op: Op,
}

/// The answer to one [`Op`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OpReply {
    /// The key's sibling set after a coordinate, or as held (read).
    Siblings(Siblings),
    /// Whether a reap removed the key.
    Reaped(bool),
    /// The operation was refused; the XML-RPC fault it would have been.
    Fault { code: i32, message: String },
    /// A merge is in the node's journal. Nobody needs the merged set back: the balancer only
    /// counts merges, so sending it would cost an encoding on each side for nothing.
    Merged,
    /// A read the node did not run because the batch's reply already carried its budget of
    /// values (the node's to set); the sender asks again
    /// in a later batch. Without it, a few concurrent reads of large keys could add up to a
    /// reply over the balancer's cap, and a healthy node would be marked down.
    Deferred,
    /// The operation arrived after its deadline and was not applied.
    Expired { late_by_us: u64 },
}

impl OpReply {
    /// Bytes of values the reply carries.
    pub fn value_bytes(&self) -> usize {
        match self {
            OpReply::Siblings(siblings) => siblings.value_bytes(),
            _ => 0,
        }
    }
}

/// Anti-entropy questions, asked top-down (see [`crate::merkle`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AaeQuery {
    /// The root hash.
    Root,
    /// The hashes of the children of `parents`, nodes of `level`.
    Children { level: usize, parents: Vec<usize> },
    /// The keys in these leaves, each with its entry hash.
    Keys { leaves: Vec<usize> },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AaeRequest {
    /// The asking node's address: the answer concerns the keys the two share.
    pub from: String,
    /// The asker's ring fingerprint; an answer from a node with another ring would be nonsense.
    pub ring: String,
    pub query: AaeQuery,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AaeReply {
    Root(u128),
    Children(Vec<u128>),
    /// Keys with their entry hashes, and the leaves they cover completely (a bounded answer
    /// may stop early; the asker compares only within complete leaves).
    /// Each entry: the key, its entry hash, and when its newest version entered the cluster
    /// (microseconds), so that a difference made by a write still in flight is left alone.
    Keys {
        entries: Vec<(String, u128, u64)>,
        complete_leaves: Vec<usize>,
    },
}

/// A key's set as a node holds it, as anti-entropy and partition transfers move it: with the
/// entry time of a delete of the key the sender reaped lately, so that a replica that missed
/// the reap drops what the reap dropped, instead of sending the tombstones back every round
/// (`node/reaped.rs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldCopy {
    pub siblings: Siblings,
    pub reaped_us: Option<u64>,
}

impl HeldCopy {
    /// A copy that says nothing of reaps (a hint, a page of a partition transfer).
    pub fn unreaped(siblings: Siblings) -> Self {
        HeldCopy {
            siblings,
            reaped_us: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MergeManyRequest {
    pub entries: Vec<(String, HeldCopy)>,
    /// As in [`Envelope::deadline_us`].
    pub deadline_us: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadManyRequest {
    pub keys: Vec<String>,
}

/// Largest key accepted, in bytes of UTF-8 (docs/protocol.md: 64 KiB).
pub const MAX_KEY_BYTES: usize = 64 * 1024;

/// Refuses keys longer than docs/protocol.md allows; balancers check before fanning out,
/// nodes again because anyone can call them.
pub fn check_key(key: &str) -> Result<()> {
    if key.len() > MAX_KEY_BYTES {
        Err(Error::invalid(format!(
            "key is {} bytes; at most {MAX_KEY_BYTES} allowed",
            key.len()
        )))
    } else {
        Ok(())
    }
}

/// Wraps a message as the one base64 parameter of an internal call.
pub fn to_param<T: Serialize>(message: &T) -> Result<Value> {
    postcard::to_allocvec(message)
        .map(Value::Base64)
        .map_err(|_| Error::Internal("message could not be encoded".into()))
}

/// Reads the message out of an internal call's parameters.
pub fn from_params<T: DeserializeOwned>(params: &[Param]) -> Result<T> {
    match params {
        [Param::Tree(Value::Base64(bytes))] => from_bytes(bytes),
        _ => Err(Error::invalid("internal calls take one base64 message")),
    }
}

/// Reads a message returned by an internal call.
pub fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T> {
    match value {
        Value::Base64(bytes) => from_bytes(bytes),
        _ => Err(Error::Internal(
            "internal reply is not a base64 message".into(),
        )),
    }
}

fn from_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|_| Error::invalid("internal message could not be decoded"))
}

/// The XML text of an internal reply.
pub fn reply_xml<T: Serialize>(message: &T) -> Result<String> {
    let bytes = postcard::to_allocvec(message)
        .map_err(|_| Error::Internal("message could not be encoded".into()))?;
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
    Ok(format!("<value><base64>{encoded}</base64></value>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip() {
        let ops = vec![
            Op::Read(ReadRequest {
                key: "a".into(),
                hint_for: None,
            }),
            Op::Reap(ReapRequest {
                key: "b".into(),
                dots: vec![],
            }),
        ];
        let bytes = postcard::to_allocvec(&ops).expect("encodes");
        let back: Vec<Op> = postcard::from_bytes(&bytes).expect("decodes");
        assert_eq!(back.len(), 2);
        let replies = vec![
            OpReply::Reaped(true),
            OpReply::Fault {
                code: -32602,
                message: "x".into(),
            },
        ];
        let bytes = postcard::to_allocvec(&replies).expect("encodes");
        assert_eq!(
            postcard::from_bytes::<Vec<OpReply>>(&bytes).expect("decodes"),
            replies
        );
    }

    #[test]
    fn messages_round_trip_as_parameters() {
        let mut siblings = Siblings::new();
        siblings.write(7, None, Some("<value><i4>1</i4></value>".into()), 5);
        let request = MergeRequest {
            key: "k\r\n<>".into(),
            siblings: siblings.clone(),
            hint_for: Some("127.0.0.1:1".into()),
        };
        let param = to_param(&request).expect("encodes");
        let back: MergeRequest = from_params(&[Param::Tree(param)]).expect("decodes");
        assert_eq!(back.key, "k\r\n<>");
        assert_eq!(back.siblings, siblings);
        assert_eq!(back.hint_for.as_deref(), Some("127.0.0.1:1"));
        let reply = reply_xml(&siblings).expect("encodes");
        let value = crate::rpc::codec::value_from_xml(&reply).expect("parses");
        assert_eq!(from_value::<Siblings>(&value).expect("decodes"), siblings);
    }

    #[test]
    fn garbage_is_an_invalid_params_error() {
        let error = from_params::<ReadRequest>(&[Param::Tree(Value::Base64(vec![0xff; 3]))])
            .expect_err("garbage");
        assert_eq!(error.fault_code(), crate::error::FAULT_INVALID_PARAMS);
        assert!(from_params::<ReadRequest>(&[Param::Tree(Value::Integer(1))]).is_err());
    }
}
