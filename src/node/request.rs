//! A storage node's requests: each XML-RPC call read once into a typed value, and the one
//! list of its methods, with their help, that `system.listMethods` and `system.methodHelp`
//! answer from. (Replica operations from balancers arrive in binary batches instead: see
//! `batch.rs`.)

use crate::error::Result;
use crate::rpc::codec::Param;
use crate::rpc::messages::{self, AaeRequest, MergeManyRequest, ReadManyRequest};
use crate::rpc::params::{key_param, put_params};
use crate::rpc::server::{self, expect_params};
use crate::security::Access;
use crate::version::VClock;

/// A storage node's methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    LocalGet,
    LocalPut,
    Put,
    Get,
    GetVersions,
    Delete,
    Explain,
    LocalExplain,
    Stats,
    Aae,
    MergeMany,
    ReadMany,
    SyncPage,
    Hashes,
    /// The `cluster.*` methods, by index in [`crate::membership::status::METHODS`].
    Cluster(usize),
}

/// A call to a storage node, read.
#[derive(Debug, Clone)]
pub enum Request {
    /// This node's own copy, for inspection.
    LocalGet {
        key: String,
    },
    /// A write of this node's own copy only, stamped with its clock; `value` is its XML text.
    LocalPut {
        key: String,
        value: String,
        context: Option<VClock>,
    },
    /// A client's `put`, `get`, `get_versions` or `delete`, coordinated by this node for the
    /// whole cluster as a balancer would.
    Coordinate(crate::balancer::request::Request),
    /// What this node holds of a key, for `explain`.
    LocalExplain {
        key: String,
    },
    Stats,
    /// Anti-entropy: a question from a peer about the keys the two share.
    Aae(AaeRequest),
    /// Anti-entropy push.
    MergeMany(MergeManyRequest),
    /// Anti-entropy pull.
    ReadMany(ReadManyRequest),
    /// A page of a partition, for a node receiving it.
    SyncPage(crate::node::sync::SyncPageRequest),
    /// Entry hashes of keys, before a node drops what a replica holds already.
    Hashes(crate::node::sync::HashesRequest),
    Cluster(crate::membership::status::ClusterCall),
}

impl server::Request for Request {
    type Method = Method;

    const METHODS: &'static [Method] = &[
        Method::Put,
        Method::Get,
        Method::GetVersions,
        Method::Delete,
        Method::Explain,
        Method::LocalGet,
        Method::LocalPut,
        Method::LocalExplain,
        Method::Stats,
        Method::Aae,
        Method::MergeMany,
        Method::ReadMany,
        Method::SyncPage,
        Method::Hashes,
        Method::Cluster(0),
        Method::Cluster(1),
        Method::Cluster(2),
        Method::Cluster(3),
        Method::Cluster(4),
        Method::Cluster(5),
        Method::Cluster(6),
        Method::Cluster(7),
    ];

    fn name(method: Method) -> &'static str {
        match method {
            Method::LocalGet => "local.get",
            Method::LocalPut => "local.put",
            Method::Put => "put",
            Method::Get => "get",
            Method::GetVersions => "get_versions",
            Method::Delete => "delete",
            Method::Explain => "explain",
            Method::LocalExplain => crate::balancer::explain::LOCAL_EXPLAIN,
            Method::Stats => "stats",
            Method::Aae => messages::AAE,
            Method::MergeMany => messages::MERGE_MANY,
            Method::ReadMany => messages::READ_MANY,
            Method::SyncPage => crate::node::sync::SYNC_PAGE_METHOD,
            Method::Hashes => crate::node::sync::HASHES_METHOD,
            Method::Cluster(i) => crate::membership::status::METHODS
                .get(i)
                .map_or("cluster.?", |(name, _)| name),
        }
    }

    fn help(method: Method) -> &'static str {
        match method {
            Method::LocalGet => "local.get(key) -> this node's own copy of the key's value, or nil",
            Method::LocalPut => {
                "local.put(key, value[, context]) -> \"200\": writes this node's copy only, no replication"
            }
            Method::LocalExplain => {
                "local.explain(key) -> {versions: [{dot, context, timestamp_us, size, tombstone}], hints: [{owner, versions}]}: what this node holds of the key"
            }
            Method::Put | Method::Get | Method::GetVersions | Method::Delete | Method::Explain => {
                <crate::balancer::request::Request as server::Request>::help(balancer_method(
                    method,
                ))
            }
            Method::Stats => "stats() -> {keys, hints, ...}: what this node holds",
            Method::Aae => {
                "node.aae(message) -> internal: anti-entropy questions from a peer about the keys the two share"
            }
            Method::MergeMany => {
                "node.merge_many(message) -> internal: merge many keys' sibling sets (anti-entropy)"
            }
            Method::ReadMany => {
                "node.read_many(message) -> internal: many keys' sibling sets (anti-entropy)"
            }
            Method::SyncPage => {
                "node.sync_page(message) -> internal: a page of a partition's keys, for a node receiving it"
            }
            Method::Hashes => {
                "node.hashes(message) -> internal: entry hashes of keys, for a node about to drop them"
            }
            Method::Cluster(i) => crate::membership::status::METHODS
                .get(i)
                .map_or("cluster.?() -> ?", |(_, help)| help),
        }
    }

    /// Everything but a client's own methods is the cluster's: a client writing one copy
    /// with `local.put`, or posting anti-entropy merges, would bypass the quorums.
    fn access(method: Method) -> Access {
        match method {
            Method::Put
            | Method::Get
            | Method::GetVersions
            | Method::Delete
            | Method::Explain
            | Method::Stats => Access::Client,
            Method::LocalGet
            | Method::LocalPut
            | Method::LocalExplain
            | Method::Aae
            | Method::MergeMany
            | Method::ReadMany
            | Method::SyncPage
            | Method::Hashes
            | Method::Cluster(_) => Access::Internal,
        }
    }

    fn parse(method: Method, params: Vec<Param>) -> Result<Request> {
        Ok(match method {
            Method::LocalGet => Request::LocalGet {
                key: key_param(params)?,
            },
            Method::LocalPut => {
                let (key, value, context) = put_params(params)?;
                Request::LocalPut {
                    key,
                    value,
                    context,
                }
            }
            Method::LocalExplain => Request::LocalExplain {
                key: key_param(params)?,
            },
            Method::Put | Method::Get | Method::GetVersions | Method::Delete | Method::Explain => {
                Request::Coordinate(
                    <crate::balancer::request::Request as server::Request>::parse(
                        balancer_method(method),
                        params,
                    )?,
                )
            }
            Method::Stats => {
                expect_params(&params, 0)?;
                Request::Stats
            }
            Method::Aae => Request::Aae(messages::from_params(&params)?),
            Method::MergeMany => Request::MergeMany(messages::from_params(&params)?),
            Method::ReadMany => Request::ReadMany(messages::from_params(&params)?),
            Method::SyncPage => Request::SyncPage(messages::from_params(&params)?),
            Method::Hashes => Request::Hashes(messages::from_params(&params)?),
            Method::Cluster(i) => Request::Cluster(crate::membership::status::parse(i, params)?),
        })
    }
}

/// The balancer's method a node's client method is.
fn balancer_method(method: Method) -> crate::balancer::request::Method {
    use crate::balancer::request::Method as B;
    match method {
        Method::Put => B::Put,
        Method::GetVersions => B::GetVersions,
        Method::Delete => B::Delete,
        Method::Explain => B::Explain,
        _ => B::Get,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::server::Request as _;

    /// Every method has a name that reads back to it and a help that starts with its call.
    #[test]
    fn methods_are_listed_once_with_their_help() {
        for &method in Request::METHODS {
            let name = Request::name(method);
            assert!(
                Request::help(method).starts_with(&format!("{name}(")),
                "{name}"
            );
        }
        // Every `cluster.*` method once: the list above names them by index.
        let cluster: Vec<&str> = Request::METHODS
            .iter()
            .map(|&m| Request::name(m))
            .filter(|name| name.starts_with("cluster."))
            .collect();
        let expected: Vec<&str> = crate::membership::status::METHODS
            .iter()
            .map(|(name, _)| *name)
            .collect();
        assert_eq!(cluster, expected);
    }

    #[test]
    fn internal_methods_take_one_message() {
        let message = messages::to_param(&ReadManyRequest {
            keys: vec!["a".into()],
        })
        .expect("encodes");
        let read = Request::parse(Method::ReadMany, vec![Param::Tree(message)]);
        assert!(matches!(read, Ok(Request::ReadMany(request)) if request.keys == ["a"]));
        let error = Request::parse(Method::ReadMany, vec![]).expect_err("no message");
        assert_eq!(error.fault_code(), crate::error::FAULT_INVALID_PARAMS);
    }
}
