//! Reading the parameters of the client-facing methods, shared by both daemons.
//!
//! Every check that turns bad input into fault -32602 lives here, so the balancer and a
//! storage node refuse the same things with the same words.

use dxr::Value;

use crate::error::{Error, Result};
use crate::rpc::codec::Param;
use crate::rpc::messages::check_key;
use crate::rpc::server;
use crate::version::VClock;

fn string_param(param: &Param, what: &str) -> Result<String> {
    match param.tree() {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(Error::invalid(format!("the {what} must be a string"))),
    }
}

pub fn key_param(params: Vec<Param>) -> Result<String> {
    server::expect_params(&params, 1)?;
    let key = string_param(&params[0], "key")?;
    check_key(&key)?;
    Ok(key)
}

fn context_param(param: &Param) -> Result<VClock> {
    let text = string_param(param, "context")?;
    VClock::from_context(&text)
        .ok_or_else(|| Error::invalid("the context is not one get_versions returned"))
}

pub fn put_params(mut params: Vec<Param>) -> Result<(String, String, Option<VClock>)> {
    if !(2..=3).contains(&params.len()) {
        return Err(Error::invalid(format!(
            "put takes (key, value) or (key, value, context), got {} parameters",
            params.len()
        )));
    }
    let key = string_param(&params[0], "key")?;
    check_key(&key)?;
    if params[1] == Param::Tree(Value::Nil) {
        return Err(Error::invalid(
            "the value may not be nil; use delete to remove a key",
        ));
    }
    let context = params.get(2).map(context_param).transpose()?;
    // Our readers hand the value over as its XML text already (see `codec::Param`).
    let value = params.swap_remove(1).into_value_xml()?;
    Ok((key, value, context))
}

pub fn delete_params(params: Vec<Param>) -> Result<(String, Option<VClock>)> {
    if !(1..=2).contains(&params.len()) {
        return Err(Error::invalid(format!(
            "delete takes (key) or (key, context), got {} parameters",
            params.len()
        )));
    }
    let key = string_param(&params[0], "key")?;
    check_key(&key)?;
    let context = params.get(1).map(context_param).transpose()?;
    Ok((key, context))
}
