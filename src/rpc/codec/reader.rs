//! Dynamite's own reader of XML-RPC calls: one pass over quick-xml's events, no recursion, so a
//! value may nest as deep as the body size limit allows.
//!
//! dxr reads through serde, whose deserializer recurses once per element and so stops at 128
//! nested elements (about 40 levels of arrays and structs). A value, though, is never needed
//! as a tree: a balancer or node only checks it and keeps its XML text, which travels to the
//! replicas and back to clients without being parsed again. This reader does that check
//! without a tree. It walks the events with an explicit stack of open elements and records
//! the value as a flat *tape* of tokens (`Array`, `Member`, `Leaf`, ... each container knowing
//! where it ends), from which the value's XML text is written by a loop. Memory is linear in
//! the body and time is linear but for sorting each struct's members.
//!
//! The text it writes is the text dxr writes for the value dxr reads, byte for byte: scalars
//! checked and normalised as dxr does (an `int` becomes `i4`, `+05` becomes `5`, base64 loses
//! its line breaks), untyped text as a string, struct members sorted by name with the last of
//! equal names kept, the same escaping. So behaviour for every existing client is the same as
//! when dxr read every call; the tests hold the two readers side by side.
//!
//! It answers only for the XML it models exactly: XML-RPC's own elements, whitespace between
//! them, comments, processing instructions, CDATA, character and predefined entity
//! references, an XML 1.0 declaration. Anything else dxr treats in ways of its own (attributes,
//! namespace prefixes, a DTD, unknown elements and stray text, which it ignores in some places
//! and not in others; XML 1.1, which changes line ends) makes it answer
//! [`Reading::Unmodelled`], and the call goes to dxr as before, depth limit included.
//!
//! Parameters other than `put`'s value (keys, contexts, `system.multicall`'s calls) become
//! `dxr::Value` trees, as handlers expect, and are refused beyond [`MAX_TREE_DEPTH`] levels;
//! none of them has a reason to nest.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::Engine as _;
use dxr::{DateTime, Value};
use quick_xml::Reader;
use quick_xml::escape::{escape, resolve_predefined_entity};
use quick_xml::events::{BytesRef, BytesStart, Event};

use super::{Call, Param};
use crate::error::{Error, Result};

/// Deepest nesting of arrays and structs in a parameter that is read into a `dxr::Value` tree
/// (every parameter but `put`'s value): trees are built, compared and dropped by recursion.
pub const MAX_TREE_DEPTH: usize = 40;

/// What the reader makes of a body.
pub enum Reading {
    /// The call, or the refusal, that dxr would give (without its depth limit).
    Read(Result<Call>),
    /// XML this reader does not model; dxr's to read.
    Unmodelled,
}

/// Reads a method call; see the module documentation.
pub fn read_call(text: &str) -> Reading {
    match Scanner::default().scan(text) {
        Ok(scan) => Reading::Read(scan.into_call()),
        Err(Stop::Refused) => Reading::Read(Err(Error::Parse(
            "body is not a well-formed XML-RPC method call".into(),
        ))),
        Err(Stop::Unmodelled) => Reading::Unmodelled,
    }
}

/// The canonical XML text of the one value in `text`, a `<value>` element alone: what `put`
/// stores for it. For tests, which compare it with dxr's.
#[cfg(test)]
pub fn value_text(text: &str) -> std::result::Result<String, Stop> {
    let call = format!(
        "<methodCall><methodName>put</methodName><params><param>{text}</param></params></methodCall>"
    );
    let scan = Scanner::default().scan(&call)?;
    match scan.params.as_slice() {
        [root] => Ok(scan.text(*root)),
        _ => Err(Stop::Refused),
    }
}

/// Why the reader stopped before the end of the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Not a call dxr would read either.
    Refused,
    /// Outside what this reader models.
    Unmodelled,
}

type Step<T> = std::result::Result<T, Stop>;

/// One entry of the tape. A value is one `Leaf`, or a container token, its members or
/// elements, and its end token.
#[derive(Debug, Clone, Copy)]
enum Token {
    /// `<array>`; `end` is the index of its `ArrayEnd`.
    Array {
        end: u32,
    },
    ArrayEnd,
    /// `<struct>`; `end` is the index of its `StructEnd`; `sorted` when its member names
    /// increase strictly, so that its text needs no reordering.
    Struct {
        end: u32,
        sorted: bool,
    },
    StructEnd,
    /// `<member>` named `names[name]`; its value follows; `end` is the index of its `MemberEnd`.
    Member {
        name: u32,
        end: u32,
    },
    MemberEnd,
    /// A scalar, `leaves[index]`.
    Leaf(u32),
}

/// A member's name before its `<name>` was read (it may follow the value).
const NO_NAME: u32 = u32::MAX;

/// A scalar value, as dxr reads it.
#[derive(Debug)]
enum Leaf {
    Integer(i32),
    Long(i64),
    Boolean(bool),
    String(String),
    Double(f64),
    DateTime(DateTime),
    Base64(Vec<u8>),
    Nil,
}

/// The scalar element types.
#[derive(Debug, Clone, Copy)]
enum Scalar {
    Integer,
    Long,
    Boolean,
    String,
    Double,
    DateTime,
    Base64,
}

/// The elements a `<value>` may hold.
#[derive(Debug, Clone, Copy)]
enum TypeElement {
    Scalar(Scalar),
    Nil,
    Array,
    Struct,
}

fn type_element(name: &str) -> Option<TypeElement> {
    Some(match name {
        "i4" | "int" => TypeElement::Scalar(Scalar::Integer),
        "i8" => TypeElement::Scalar(Scalar::Long),
        "boolean" => TypeElement::Scalar(Scalar::Boolean),
        "string" => TypeElement::Scalar(Scalar::String),
        "double" => TypeElement::Scalar(Scalar::Double),
        "dateTime.iso8601" => TypeElement::Scalar(Scalar::DateTime),
        "base64" => TypeElement::Scalar(Scalar::Base64),
        "nil" => TypeElement::Nil,
        "array" => TypeElement::Array,
        "struct" => TypeElement::Struct,
        _ => return None,
    })
}

/// An open element, innermost last.
#[derive(Debug, Clone, Copy)]
enum Frame {
    /// Before `<methodCall>`.
    Prolog,
    MethodCall {
        name: bool,
        params: bool,
    },
    MethodName,
    Params,
    Param {
        value: bool,
    },
    /// `<value>`; `keyed` once it has content (a type element or text that is not blank).
    Value {
        keyed: bool,
    },
    Scalar(Scalar),
    /// `<nil>`, whose content is skipped; `depth` counts the elements open inside it.
    Nil {
        depth: u32,
    },
    Array {
        token: u32,
        data: bool,
    },
    Data,
    Struct {
        token: u32,
    },
    Member {
        token: u32,
        value: bool,
    },
    Name,
}

/// Character data since the last tag: text, CDATA and references, which comments and
/// processing instructions do not interrupt (dxr joins them too).
#[derive(Default)]
struct Run {
    /// The characters, kept only where they can be content (see [`Scanner::keeps_text`]).
    text: String,
    /// Whether anything was read.
    any: bool,
    /// Whether it was only whitespace text: no CDATA, no reference.
    whitespace: bool,
}

impl Run {
    fn text(&mut self, content: &str, keep: bool) {
        if !self.any {
            self.whitespace = true;
        }
        self.any = true;
        self.whitespace &= content.bytes().all(is_xml_space);
        if keep {
            self.text.push_str(content);
        }
    }

    fn cdata(&mut self, content: &str, keep: bool) {
        self.any = true;
        self.whitespace = false;
        if keep {
            self.text.push_str(content);
        }
    }

    fn reference(&mut self, reference: &BytesRef<'_>, keep: bool) -> Step<()> {
        self.any = true;
        self.whitespace = false;
        // Resolved even where unused: dxr refuses an unknown entity wherever it reads one.
        let mut buffer = [0; 4];
        let resolved = match reference.resolve_char_ref() {
            Ok(Some(c)) => &*c.encode_utf8(&mut buffer),
            Ok(None) => resolve_predefined_entity(reference).ok_or(Stop::Refused)?,
            Err(_) => return Err(Stop::Refused),
        };
        if keep {
            self.text.push_str(resolved);
        }
        Ok(())
    }
}

/// XML's whitespace: space, tab, carriage return, line feed.
fn is_xml_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_blank(text: &str) -> bool {
    text.bytes().all(is_xml_space)
}

#[derive(Default)]
struct Scanner {
    frames: Vec<Frame>,
    tape: Vec<Token>,
    leaves: Vec<Leaf>,
    names: Vec<String>,
    /// The tape index where each parameter's value starts.
    params: Vec<usize>,
    method: Option<String>,
    run: Run,
    /// Text waiting for the end of its element: a scalar's, a name's, or a `<value>`'s own.
    held: Option<String>,
}

/// A call as read: the method and the parameters on the tape.
struct Scan {
    method: String,
    params: Vec<usize>,
    tape: Vec<Token>,
    leaves: Vec<Leaf>,
    names: Vec<String>,
}

impl Scanner {
    fn scan(mut self, text: &str) -> Step<Scan> {
        let mut reader = Reader::from_str(text);
        // As dxr's deserializer sets it: `<a/>` reads as `<a></a>`.
        reader.config_mut().expand_empty_elements = true;
        self.frames.push(Frame::Prolog);
        loop {
            let event = reader.read_event().map_err(|_| Stop::Refused)?;
            if let Some(&Frame::Nil { depth }) = self.frames.last() {
                self.skip_in_nil(depth, &event)?;
                continue;
            }
            match event {
                Event::Text(text) => self.run.text(&text.xml10_content(), self.keeps_text()),
                Event::CData(cdata) => self.run.cdata(&cdata.xml10_content(), self.keeps_text()),
                Event::GeneralRef(reference) => {
                    self.run.reference(&reference, self.keeps_text())?;
                }
                Event::Comment(_) | Event::PI(_) => {}
                Event::Decl(declaration) => {
                    // XML 1.1 normalises more line ends than 1.0.
                    match declaration.version() {
                        Ok(version) if version.as_ref() == "1.0" => {}
                        _ => return Err(Stop::Unmodelled),
                    }
                }
                Event::DocType(_) => return Err(Stop::Unmodelled),
                Event::Start(start) => {
                    self.flush_run()?;
                    self.start(&start)?;
                }
                Event::End(_) => {
                    self.flush_run()?;
                    // The reader checks that end tags match their start tags.
                    if self.end()? {
                        break;
                    }
                }
                // Not produced with `expand_empty_elements`.
                Event::Empty(_) => return Err(Stop::Unmodelled),
                Event::Eof => {
                    return Err(match self.frames.last() {
                        Some(Frame::Prolog) => Stop::Unmodelled,
                        _ => Stop::Refused,
                    });
                }
            }
        }
        // Like dxr, nothing after the end of `<methodCall>` is read.
        Ok(Scan {
            method: self.method.ok_or(Stop::Refused)?,
            params: self.params,
            tape: self.tape,
            leaves: self.leaves,
            names: self.names,
        })
    }

    /// Inside `<nil>` everything is skipped unread, as dxr does, but for the elements' nesting.
    fn skip_in_nil(&mut self, depth: u32, event: &Event<'_>) -> Step<()> {
        let depth = match event {
            Event::Start(_) => depth.checked_add(1).ok_or(Stop::Refused)?,
            Event::End(_) if depth == 0 => {
                self.frames.pop();
                self.leaf(Leaf::Nil)?;
                return Ok(());
            }
            Event::End(_) => depth - 1,
            Event::Eof => return Err(Stop::Refused),
            Event::Decl(_) | Event::DocType(_) | Event::Empty(_) => return Err(Stop::Unmodelled),
            _ => depth,
        };
        if let Some(Frame::Nil { depth: open }) = self.frames.last_mut() {
            *open = depth;
        }
        Ok(())
    }

    /// Whether character data in the innermost element is content: a value's, a scalar's or a
    /// name's. Elsewhere only whether it is whitespace counts.
    fn keeps_text(&self) -> bool {
        matches!(
            self.frames.last(),
            Some(Frame::MethodName | Frame::Name | Frame::Scalar(_) | Frame::Value { .. })
        )
    }

    /// Hands the character data read since the last tag to the innermost element.
    fn flush_run(&mut self) -> Step<()> {
        if !std::mem::take(&mut self.run.any) {
            return Ok(());
        }
        match self.frames.last_mut() {
            Some(Frame::MethodName | Frame::Name | Frame::Scalar(_)) => {
                self.held = Some(std::mem::take(&mut self.run.text));
            }
            Some(Frame::Value { keyed }) => {
                if is_blank(&self.run.text) {
                    self.run.text.clear();
                    return Ok(());
                }
                // Text and an element, or text on both sides of one: dxr refuses both.
                if *keyed {
                    return Err(Stop::Refused);
                }
                *keyed = true;
                self.held = Some(std::mem::take(&mut self.run.text));
            }
            // Whitespace between elements is layout; dxr skips other text in some places and
            // not in others.
            _ if self.run.whitespace => self.run.text.clear(),
            _ => return Err(Stop::Unmodelled),
        }
        Ok(())
    }

    fn start(&mut self, start: &BytesStart<'_>) -> Step<()> {
        let name = start.name();
        let name = name.as_ref();
        // Attributes, namespace prefixes and serde's own names (`$text`, `@attr`) mean
        // something to dxr's deserializer, which is not always "ignore".
        if start.attributes().next().is_some()
            || name.contains(':')
            || name.starts_with("$")
            || name.starts_with("@")
        {
            return Err(Stop::Unmodelled);
        }
        let top = *self.frames.last().ok_or(Stop::Refused)?;
        let frame = match (top, name) {
            (Frame::Prolog, "methodCall") => Frame::MethodCall {
                name: false,
                params: false,
            },
            (Frame::MethodCall { name: seen, params }, "methodName") => {
                refuse_twice(seen)?;
                self.replace_top(Frame::MethodCall { name: true, params });
                Frame::MethodName
            }
            (Frame::MethodCall { name, params: seen }, "params") => {
                refuse_twice(seen)?;
                self.replace_top(Frame::MethodCall { name, params: true });
                Frame::Params
            }
            (Frame::Params, "param") => Frame::Param { value: false },
            (Frame::Param { value: seen }, "value") => {
                refuse_twice(seen)?;
                self.replace_top(Frame::Param { value: true });
                self.params.push(self.tape.len());
                Frame::Value { keyed: false }
            }
            (Frame::Value { keyed }, _) => {
                // An element that is not a type: dxr's "unknown field".
                let kind = type_element(name).ok_or(Stop::Refused)?;
                // Two type elements, or text and one.
                refuse_twice(keyed)?;
                self.replace_top(Frame::Value { keyed: true });
                match kind {
                    TypeElement::Scalar(scalar) => Frame::Scalar(scalar),
                    TypeElement::Nil => Frame::Nil { depth: 0 },
                    TypeElement::Array => Frame::Array {
                        token: self.push(Token::Array { end: 0 })?,
                        data: false,
                    },
                    TypeElement::Struct => Frame::Struct {
                        token: self.push(Token::Struct {
                            end: 0,
                            sorted: true,
                        })?,
                    },
                }
            }
            (Frame::Array { token, data }, "data") => {
                refuse_twice(data)?;
                self.replace_top(Frame::Array { token, data: true });
                Frame::Data
            }
            (Frame::Data, "value") => Frame::Value { keyed: false },
            (Frame::Struct { .. }, "member") => Frame::Member {
                token: self.push(Token::Member {
                    name: NO_NAME,
                    end: 0,
                })?,
                value: false,
            },
            (Frame::Member { token, .. }, "name") => {
                let named = !matches!(
                    self.tape.get(token as usize),
                    Some(Token::Member { name: NO_NAME, .. })
                );
                refuse_twice(named)?;
                Frame::Name
            }
            (Frame::Member { token, value }, "value") => {
                refuse_twice(value)?;
                self.replace_top(Frame::Member { token, value: true });
                Frame::Value { keyed: false }
            }
            // An element inside text-only content.
            (Frame::MethodName | Frame::Name | Frame::Scalar(_), _) => return Err(Stop::Refused),
            // Elements XML-RPC does not have where dxr ignores them, or not.
            _ => return Err(Stop::Unmodelled),
        };
        self.frames.push(frame);
        Ok(())
    }

    fn replace_top(&mut self, frame: Frame) {
        if let Some(top) = self.frames.last_mut() {
            *top = frame;
        }
    }

    /// Closes the innermost element; true at the end of `<methodCall>`.
    fn end(&mut self) -> Step<bool> {
        let frame = self.frames.pop().ok_or(Stop::Refused)?;
        let held = self.held.take();
        match frame {
            Frame::Prolog | Frame::Nil { .. } => return Err(Stop::Refused),
            Frame::MethodCall { name, .. } => {
                return if name { Ok(true) } else { Err(Stop::Refused) };
            }
            Frame::MethodName => self.method = Some(not_blank(held)?),
            Frame::Params | Frame::Data => {}
            Frame::Param { value } => {
                if !value {
                    return Err(Stop::Refused);
                }
            }
            Frame::Value { keyed } => {
                // Untyped text is a string; so is nothing at all.
                if held.is_some() || !keyed {
                    self.leaf(Leaf::String(held.unwrap_or_default()))?;
                }
            }
            Frame::Scalar(kind) => {
                let text = held.unwrap_or_default();
                self.leaf(scalar(kind, text)?)?;
            }
            Frame::Array { token, .. } => {
                let end = self.push(Token::ArrayEnd)?;
                self.tape[token as usize] = Token::Array { end };
            }
            Frame::Struct { token } => {
                let end = self.push(Token::StructEnd)?;
                let name = |index: u32| self.names.get(index as usize);
                let sorted = members(&self.tape, token as usize, end as usize)
                    .is_sorted_by(|a, b| name(a.0) < name(b.0));
                self.tape[token as usize] = Token::Struct { end, sorted };
            }
            Frame::Member { token, value } => {
                let end = self.push(Token::MemberEnd)?;
                match self.tape.get_mut(token as usize) {
                    Some(Token::Member {
                        name,
                        end: member_end,
                    }) if *name != NO_NAME && value => {
                        *member_end = end;
                    }
                    // dxr: "missing field".
                    _ => return Err(Stop::Refused),
                }
            }
            Frame::Name => {
                let name = not_blank(held)?;
                let index = u32::try_from(self.names.len()).map_err(|_| Stop::Refused)?;
                self.names.push(name);
                if let Some(Frame::Member { token, .. }) = self.frames.last()
                    && let Some(Token::Member { name, .. }) = self.tape.get_mut(*token as usize)
                {
                    *name = index;
                }
            }
        }
        Ok(false)
    }

    fn push(&mut self, token: Token) -> Step<u32> {
        let index = u32::try_from(self.tape.len()).map_err(|_| Stop::Refused)?;
        self.tape.push(token);
        Ok(index)
    }

    fn leaf(&mut self, leaf: Leaf) -> Step<()> {
        let index = u32::try_from(self.leaves.len()).map_err(|_| Stop::Refused)?;
        self.leaves.push(leaf);
        self.push(Token::Leaf(index))?;
        Ok(())
    }
}

/// The members of the struct whose tokens run from `start` to `end`: each one's name index
/// and the tape indexes of its `Member` and `MemberEnd`.
fn members(tape: &[Token], start: usize, end: usize) -> Vec<(u32, usize, usize)> {
    let mut found = Vec::new();
    let mut at = start + 1;
    while at < end {
        match tape.get(at) {
            Some(&Token::Member {
                name,
                end: member_end,
            }) => {
                found.push((name, at, member_end as usize));
                at = member_end as usize + 1;
            }
            _ => break,
        }
    }
    found
}

/// An element that may appear once, seen a second time: dxr's "duplicate field".
fn refuse_twice(seen: bool) -> Step<()> {
    if seen { Err(Stop::Refused) } else { Ok(()) }
}

/// A name or method name: dxr refuses it empty or blank.
fn not_blank(text: Option<String>) -> Step<String> {
    match text {
        Some(text) if !is_blank(&text) => Ok(text),
        _ => Err(Stop::Refused),
    }
}

/// A scalar element's content, checked as dxr checks it.
fn scalar(kind: Scalar, text: String) -> Step<Leaf> {
    // Numbers are read as serde reads them from XML: surrounding whitespace trimmed, then
    // Rust's own parse. The other types take the text as it is.
    let number = text.trim_matches(|c: char| c.is_ascii() && is_xml_space(c as u8));
    let leaf = match kind {
        Scalar::Integer => Leaf::Integer(number.parse().map_err(|_| Stop::Refused)?),
        Scalar::Long => Leaf::Long(number.parse().map_err(|_| Stop::Refused)?),
        Scalar::Double => Leaf::Double(number.parse().map_err(|_| Stop::Refused)?),
        Scalar::Boolean => match text.as_str() {
            "1" => Leaf::Boolean(true),
            "0" => Leaf::Boolean(false),
            _ => return Err(Stop::Refused),
        },
        Scalar::String => Leaf::String(text),
        Scalar::DateTime => Leaf::DateTime(text.parse().map_err(|_| Stop::Refused)?),
        Scalar::Base64 => {
            // Line breaks and other ASCII whitespace are allowed, as some clients wrap.
            let packed: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(packed)
                .map_err(|_| Stop::Refused)?;
            Leaf::Base64(bytes)
        }
    };
    Ok(leaf)
}

impl Scan {
    fn into_call(mut self) -> Result<Call> {
        let roots = std::mem::take(&mut self.params);
        let mut params = Vec::with_capacity(roots.len());
        for (index, root) in roots.into_iter().enumerate() {
            params.push(match (self.method.as_str(), index) {
                ("put", 1) => self.value_param(root),
                ("system.multicall", 0) => self.multicall_param(root)?,
                _ => Param::Tree(self.tree(root, MAX_TREE_DEPTH)?),
            });
        }
        Ok(Call {
            method: std::mem::take(&mut self.method),
            params,
        })
    }

    /// `put`'s value: its XML text, or nil for the handler to refuse.
    fn value_param(&self, root: usize) -> Param {
        match self.tape.get(root) {
            Some(&Token::Leaf(index))
                if matches!(self.leaves.get(index as usize), Some(Leaf::Nil)) =>
            {
                Param::Tree(Value::Nil)
            }
            _ => Param::Text(self.text(root)),
        }
    }

    /// `system.multicall`'s array of `{methodName, params}` structs as calls, each `put`'s
    /// value as its text, so that it may nest as deep as it does in a plain `put`. An entry
    /// dxr would not take for a call is `None`; a parameter that is no array stays a tree,
    /// which the handler then refuses as dxr's rules say.
    fn multicall_param(&mut self, root: usize) -> Result<Param> {
        let Some(&Token::Array { end }) = self.tape.get(root) else {
            return Ok(Param::Tree(self.tree(root, MAX_TREE_DEPTH)?));
        };
        let mut calls = Vec::new();
        let mut at = root + 1;
        while at < end as usize {
            calls.push(match self.tape.get(at) {
                Some(&Token::Struct { end, .. }) => self.multicall_call(at, end as usize)?,
                _ => {
                    // Read all the same: a value nested too deep is refused as in a tree.
                    self.tree(at, MAX_TREE_DEPTH)?;
                    None
                }
            });
            at = self.after(at);
        }
        Ok(Param::Calls(calls))
    }

    /// One entry of a multicall: a call when the struct holds exactly a `methodName` string
    /// and a `params` array (as in a struct's tree, the last of equal names counts), as dxr's
    /// `from_multicall_params` requires; `None` otherwise.
    fn multicall_call(&mut self, start: usize, end: usize) -> Result<Option<Call>> {
        let members = members(&self.tape, start, end);
        let mut last: BTreeMap<String, usize> = BTreeMap::new();
        for &(name, member, _) in &members {
            last.insert(self.name(name).to_owned(), member);
        }
        let (Some(&name_member), Some(&params_member), 2) =
            (last.get("methodName"), last.get("params"), last.len())
        else {
            for &(_, member, _) in &members {
                self.tree(member + 1, MAX_TREE_DEPTH)?;
            }
            return Ok(None);
        };
        let method = match self.tape.get(name_member + 1) {
            Some(&Token::Leaf(index)) => match self.leaves.get(index as usize) {
                Some(Leaf::String(method)) => Some(method.clone()),
                _ => None,
            },
            _ => None,
        };
        let params_at = params_member + 1;
        let (Some(method), Some(&Token::Array { end: params_end })) =
            (method, self.tape.get(params_at))
        else {
            self.tree(name_member + 1, MAX_TREE_DEPTH)?;
            self.tree(params_at, MAX_TREE_DEPTH)?;
            return Ok(None);
        };
        let mut params = Vec::new();
        let mut at = params_at + 1;
        while at < params_end as usize {
            params.push(if method == "put" && params.len() == 1 {
                self.value_param(at)
            } else {
                Param::Tree(self.tree(at, MAX_TREE_DEPTH)?)
            });
            at = self.after(at);
        }
        Ok(Some(Call { method, params }))
    }

    /// The tape index just after the value starting at `at`.
    fn after(&self, at: usize) -> usize {
        match self.tape.get(at) {
            Some(&Token::Array { end } | &Token::Struct { end, .. }) => end as usize + 1,
            _ => at + 1,
        }
    }

    /// The value starting at `at` as a tree, at most `levels` arrays and structs deep.
    /// Recursive, within that bound.
    fn tree(&mut self, at: usize, levels: usize) -> Result<Value> {
        let too_deep = || {
            Error::invalid(format!(
                "parameter nested deeper than {MAX_TREE_DEPTH} levels (only put's value may nest deeper)"
            ))
        };
        match self.tape.get(at).copied() {
            Some(Token::Leaf(index)) => {
                let leaf = self
                    .leaves
                    .get_mut(index as usize)
                    .map(|leaf| std::mem::replace(leaf, Leaf::Nil));
                Ok(match leaf {
                    Some(Leaf::Integer(n)) => Value::Integer(n),
                    Some(Leaf::Long(n)) => Value::Long(n),
                    Some(Leaf::Boolean(b)) => Value::Boolean(b),
                    Some(Leaf::String(s)) => Value::String(s),
                    Some(Leaf::Double(d)) => Value::Double(d),
                    Some(Leaf::DateTime(d)) => Value::DateTime(d),
                    Some(Leaf::Base64(b)) => Value::Base64(b),
                    Some(Leaf::Nil) | None => Value::Nil,
                })
            }
            Some(Token::Array { end }) => {
                let levels = levels.checked_sub(1).ok_or_else(too_deep)?;
                let mut items = Vec::new();
                let mut at = at + 1;
                while at < end as usize {
                    items.push(self.tree(at, levels)?);
                    at = self.after(at);
                }
                Ok(Value::Array(items))
            }
            Some(Token::Struct { end, .. }) => {
                let levels = levels.checked_sub(1).ok_or_else(too_deep)?;
                let mut map = BTreeMap::new();
                for (name, member, _) in members(&self.tape, at, end as usize) {
                    let value = self.tree(member + 1, levels)?;
                    let name = self.names.get(name as usize).cloned().unwrap_or_default();
                    // The last of equal names wins, as when dxr collects them.
                    map.insert(name, value);
                }
                Ok(Value::Struct(map))
            }
            _ => Err(Error::Internal("value tape out of step".into())),
        }
    }

    /// The XML text of the value starting at `at`, exactly as `codec::value_to_xml` writes
    /// the tree dxr reads for it. A loop over the tape: segments of it are written in order,
    /// and a struct whose members are out of order pushes them as segments sorted by name.
    fn text(&self, at: usize) -> String {
        // A string alone takes codec's direct path, as `value_to_xml` does.
        if let Some(&Token::Leaf(index)) = self.tape.get(at)
            && let Some(Leaf::String(text)) = self.leaves.get(index as usize)
        {
            return super::string_xml(text);
        }
        let mut out = String::new();
        let mut segments = vec![(at, self.after(at))];
        while let Some((mut at, end)) = segments.pop() {
            while at < end {
                let Some(&token) = self.tape.get(at) else {
                    break;
                };
                match token {
                    Token::Leaf(index) => {
                        if let Some(leaf) = self.leaves.get(index as usize) {
                            write_leaf(leaf, &mut out);
                        }
                    }
                    Token::Array { .. } => out.push_str("<value><array><data>"),
                    Token::ArrayEnd => out.push_str("</data></array></value>"),
                    Token::Struct { sorted: true, .. } => out.push_str("<value><struct>"),
                    Token::Struct {
                        end: struct_end,
                        sorted: false,
                    } => {
                        out.push_str("<value><struct>");
                        // The rest of this segment, from the struct's end token on...
                        segments.push((struct_end as usize, end));
                        // ...after its members, by name, the last of equal names kept.
                        let mut members = members(&self.tape, at, struct_end as usize);
                        members.sort_by(|a, b| self.name(a.0).cmp(self.name(b.0)));
                        let mut kept: Vec<(usize, usize)> = Vec::with_capacity(members.len());
                        for (i, &(name, start, member_end)) in members.iter().enumerate() {
                            let next_is_same = members
                                .get(i + 1)
                                .is_some_and(|next| self.name(next.0) == self.name(name));
                            if !next_is_same {
                                kept.push((start, member_end + 1));
                            }
                        }
                        segments.extend(kept.into_iter().rev());
                        break;
                    }
                    Token::StructEnd => out.push_str("</struct></value>"),
                    Token::Member { name, .. } => {
                        out.push_str("<member><name>");
                        out.push_str(&escape(self.name(name)));
                        out.push_str("</name>");
                    }
                    Token::MemberEnd => out.push_str("</member>"),
                }
                at += 1;
            }
        }
        out
    }

    fn name(&self, index: u32) -> &str {
        self.names.get(index as usize).map_or("", String::as_str)
    }
}

/// A scalar as dxr's serializer writes it inside an array or struct.
fn write_leaf(leaf: &Leaf, out: &mut String) {
    // Writing to a String cannot fail.
    let _ = match leaf {
        Leaf::Integer(n) => write!(out, "<value><i4>{n}</i4></value>"),
        Leaf::Long(n) => write!(out, "<value><i8>{n}</i8></value>"),
        Leaf::Boolean(b) => write!(out, "<value><boolean>{}</boolean></value>", u8::from(*b)),
        Leaf::String(text) => write!(out, "<value><string>{}</string></value>", escape(text)),
        Leaf::Double(d) => write!(out, "<value><double>{d}</double></value>"),
        Leaf::DateTime(d) => write!(
            out,
            "<value><dateTime.iso8601>{d}</dateTime.iso8601></value>"
        ),
        Leaf::Base64(bytes) => {
            out.push_str("<value><base64>");
            base64::engine::general_purpose::STANDARD.encode_string(bytes, out);
            out.push_str("</base64></value>");
            Ok(())
        }
        Leaf::Nil => write!(out, "<value><nil></nil></value>"),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::codec::{multicall_calls, parse_call, value_to_xml};
    use proptest::prelude::*;

    /// `depth` levels of arrays and structs, alternating, around an int.
    fn nested(depth: usize) -> String {
        let mut open = String::new();
        let mut close = Vec::new();
        for level in 0..depth {
            if level % 2 == 0 {
                open.push_str("<value><array><data>");
                close.push("</data></array></value>");
            } else {
                open.push_str("<value><struct><member><name>m</name>");
                close.push("</member></struct></value>");
            }
        }
        close.reverse();
        format!("{open}<value><int>7</int></value>{}", close.concat())
    }

    /// What dxr stores for a `<value>` document: its tree, written out.
    fn by_dxr(text: &str) -> Option<String> {
        let value = Value::from_xml(text).ok()?;
        Some(value_to_xml(&value).expect("dxr writes what it reads"))
    }

    #[test]
    fn accepts_and_refuses_values_as_dxr_does() {
        use Stop::{Refused, Unmodelled};
        let ok = |text: &str| Ok::<String, Stop>(text.to_owned());
        let cases: Vec<(&str, std::result::Result<String, Stop>)> = vec![
            // Scalars, normalised as dxr normalises them.
            (
                "<value><int> +05 </int></value>",
                ok("<value><i4>5</i4></value>"),
            ),
            (
                "<value><i8>-9223372036854775808</i8></value>",
                ok("<value><i8>-9223372036854775808</i8></value>"),
            ),
            ("<value><i4>2147483648</i4></value>", Err(Refused)),
            ("<value><i4></i4></value>", Err(Refused)),
            ("<value><boolean> 1 </boolean></value>", Err(Refused)),
            (
                "<value><double>1E3</double></value>",
                ok("<value><double>1000</double></value>"),
            ),
            (
                "<value><double>-nan</double></value>",
                ok("<value><double>NaN</double></value>"),
            ),
            (
                "<value><base64> AA\nE= </base64></value>",
                ok("<value><base64>AAE=</base64></value>"),
            ),
            ("<value><base64>AAF=</base64></value>", Err(Refused)),
            (
                "<value><dateTime.iso8601>20230229T00:00:00</dateTime.iso8601></value>",
                Err(Refused),
            ),
            // Strings: untyped text, entities, CDATA and comments joined, line ends normalised.
            ("<value/>", ok("<value><string></string></value>")),
            ("<value>  </value>", ok("<value><string></string></value>")),
            (
                "<value> a&amp;<![CDATA[<b>]]><!-- c -->\r\n</value>",
                ok("<value><string> a&amp;&lt;b&gt;\n</string></value>"),
            ),
            (
                "<value> <string> x </string>\n</value>",
                ok("<value><string> x </string></value>"),
            ),
            ("<value>a<string>x</string></value>", Err(Refused)),
            ("<value><string>x</string><i4>1</i4></value>", Err(Refused)),
            ("<value><string>&#0;</string></value>", Err(Refused)),
            ("<value><string>&nbsp;</string></value>", Err(Refused)),
            ("<value><string><b>x</b></string></value>", Err(Refused)),
            ("<value><foo>1</foo></value>", Err(Refused)),
            // Nil: refused by put at the top (by its handler), kept where nested, content skipped.
            ("<value><nil/></value>", ok("<value><nil></nil></value>")),
            (
                "<value><array><data><value><struct><member><name>n</name><value><nil>&#0;<x/></nil></value></member></struct></value></data></array></value>",
                ok(
                    "<value><array><data><value><struct><member><name>n</name><value><nil></nil></value></member></struct></value></data></array></value>",
                ),
            ),
            // Structs: sorted by name, the last of equal names kept, quotes escaped inside.
            (
                "<value><struct><member><name>b</name><value>1</value></member><member><value>2</value><name>a</name></member><member><name>b</name><value>\"3\"</value></member></struct></value>",
                ok(
                    "<value><struct><member><name>a</name><value><string>2</string></value></member><member><name>b</name><value><string>&quot;3&quot;</string></value></member></struct></value>",
                ),
            ),
            (
                "<value><struct><member><name> </name><value>1</value></member></struct></value>",
                Err(Refused),
            ),
            (
                "<value><struct><member><name>a</name></member></struct></value>",
                Err(Refused),
            ),
            (
                "<value><struct><member><name>a</name><name>b</name><value>1</value></member></struct></value>",
                Err(Refused),
            ),
            ("<value><array><data/><data/></array></value>", Err(Refused)),
            (
                "<value><array/></value>",
                ok("<value><array><data></data></array></value>"),
            ),
            // Malformed XML.
            (
                "<value><array><data><value>1</value></data></value>",
                Err(Refused),
            ),
            ("<value><array><data><value>1</value>", Err(Refused)),
            ("<value><string>a & b</string></value>", Err(Refused)),
            // XML dxr treats in ways of its own goes to dxr.
            ("<value><string a='1'>x</string></value>", Err(Unmodelled)),
            ("<value><x:string>x</x:string></value>", Err(Unmodelled)),
            ("<value><$text>x</$text></value>", Err(Unmodelled)),
            (
                "<value><array><data><x/></data></array></value>",
                Err(Unmodelled),
            ),
            ("<value><struct>text</struct></value>", Err(Unmodelled)),
            (
                "<value><array> <!-- ok --> <data/> </array></value>",
                ok("<value><array><data></data></array></value>"),
            ),
        ];
        for (text, expected) in cases {
            let read = value_text(text);
            assert_eq!(read, expected, "{text}");
            if let Ok(read) = read {
                assert_eq!(Some(read), by_dxr(text), "dxr disagrees on {text}");
            } else if expected == Err(Refused) {
                assert_eq!(by_dxr(text), None, "dxr reads {text}");
            }
        }
    }

    #[test]
    fn depth_one_reads_as_dxr_does_and_ten_thousand_reads_too() {
        let one = nested(1);
        assert_eq!(value_text(&one).ok(), by_dxr(&one));
        let forty = nested(MAX_TREE_DEPTH);
        assert_eq!(value_text(&forty).ok(), by_dxr(&forty));
        // dxr stops near 41 levels; the reader does not.
        let deep = nested(10_000);
        assert_eq!(by_dxr(&deep), None);
        let text = value_text(&deep).expect("10,000 levels read");
        assert_eq!(text, deep.replace("<int>7</int>", "<i4>7</i4>"));
        // Broken at the bottom, or one tag mismatched in the middle: refused, not overflowed.
        let unclosed = deep.replacen("</data>", "", 1);
        assert_eq!(value_text(&unclosed), Err(Stop::Refused));
        let mismatched = deep.replacen("</member>", "</name>", 1);
        assert_eq!(value_text(&mismatched), Err(Stop::Refused));
        let nil_at_depth = deep.replace("<int>7</int>", "<nil/>");
        assert_eq!(
            value_text(&nil_at_depth),
            Ok(deep.replace("<int>7</int>", "<nil></nil>"))
        );
    }

    #[test]
    fn a_wide_struct_of_deep_members_is_sorted_in_linear_passes() {
        // Every level's struct out of order: each level is reordered once, not copied again
        // for each level above it.
        let mut value = "<value><i4>0</i4></value>".to_owned();
        let mut expected = value.clone();
        for level in 0..5_000 {
            value = format!(
                "<value><struct><member><name>z</name>{value}</member><member><name>a</name><value><i4>{level}</i4></value></member></struct></value>"
            );
            expected = format!(
                "<value><struct><member><name>a</name><value><i4>{level}</i4></value></member><member><name>z</name>{expected}</member></struct></value>"
            );
        }
        assert_eq!(value_text(&value), Ok(expected));
    }

    /// The parameters as `put` stores or a handler reads them: text for `put`'s value, the
    /// tree written out for the others, multicall's calls one by one.
    fn stored(method: &str, params: Vec<Param>) -> Vec<String> {
        let mut out = Vec::new();
        if method == "system.multicall" {
            match multicall_calls(params) {
                Ok(calls) => {
                    for call in calls {
                        match call {
                            Some(call) => {
                                out.push(format!("call {}", call.method));
                                out.extend(stored(&call.method, call.params));
                            }
                            None => out.push("not a call".into()),
                        }
                    }
                }
                Err(_) => out.push("not a multicall".into()),
            }
            return out;
        }
        for param in params {
            out.push(param.into_value_xml().expect("parameters write out"));
        }
        out
    }

    /// What the reader makes of a call, or None when it leaves the call to dxr.
    fn read(body: &str) -> Option<std::result::Result<(String, Vec<String>), ()>> {
        match read_call(body) {
            Reading::Unmodelled => None,
            Reading::Read(Ok(call)) => {
                let params = stored(&call.method, call.params);
                Some(Ok((call.method, params)))
            }
            Reading::Read(Err(_)) => Some(Err(())),
        }
    }

    fn read_by_dxr(body: &str) -> std::result::Result<(String, Vec<String>), ()> {
        let call = dxr::MethodCall::from_xml(body).map_err(|_| ())?;
        let method = call.name.into_owned();
        let params = stored(&method, call.params.into_iter().map(Param::Tree).collect());
        Ok((method, params))
    }

    // Random calls written every way XML allows, often broken.

    fn space() -> impl Strategy<Value = String> {
        // Layout, mostly; now and then character data that is not, which dxr ignores in some
        // places and refuses in others.
        prop_oneof![
            120 => Just(""),
            20 => Just(" "),
            20 => Just("\n"),
            15 => Just("\r\n\t"),
            15 => Just("<!-- c -->"),
            10 => Just("<?pi x?>"),
            1 => Just("&#32;"),
            1 => Just("<![CDATA[ ]]>"),
            1 => Just(" stray "),
        ]
        .prop_map(str::to_owned)
    }

    fn text() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            6 => "[a-zA-Z0-9 ]{0,5}",
            1 => "\\PC{0,3}",
            4 => prop::sample::select(vec![
                "&amp;", "&lt;", "&gt;", "&quot;", "&apos;", "&#65;", "&#x1F980;", "&#13;",
                "&#32;", "&#x85;", "<![CDATA[ <&>\r\n ]]>", "<![CDATA[]]>", "<!--c-->", "<?p?>",
                "\r\n", "\r", "\t", "\n", " ", "\"'", ">", "]]>", "é✓", "\u{1}",
            ])
            .prop_map(str::to_owned),
            1 => prop::sample::select(vec!["&#0;", "&bogus;", "&", "<", "&#xD800;"])
                .prop_map(str::to_owned),
        ];
        prop::collection::vec(piece, 0..4).prop_map(|pieces| pieces.concat())
    }

    fn scalar() -> impl Strategy<Value = String> {
        let number = prop_oneof![
            any::<i32>().prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|n| format!("{n:e}")),
            "[ \\n]{0,2}[+-]{0,2}0{0,2}[0-9]{0,3}(\\.[0-9]{0,2})?([eE][+-]?[0-9]{1,3})?[ \\n]{0,2}",
            prop::sample::select(vec![
                "nan",
                "-NaN",
                "inf",
                "-Infinity",
                "1e400",
                ".5",
                "5.",
                "1_0",
                "0x10",
                "",
            ])
            .prop_map(str::to_owned),
            text(),
        ];
        let date = prop_oneof![
            "[0-9]{4}(0[1-9]|1[0-2])(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]",
            "[0-9 T:+-]{0,18}",
        ];
        let base64 = prop_oneof![
            (
                prop::collection::vec(any::<u8>(), 0..12),
                "[ \\n\u{c}]{0,2}"
            )
                .prop_map(|(bytes, space)| {
                    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
                    let middle = encoded.len() / 2;
                    format!("{space}{}{space}{}", &encoded[..middle], &encoded[middle..])
                }),
            "[A-Za-z0-9+/= ]{0,9}",
        ];
        let typed = prop_oneof![
            (
                prop::sample::select(vec!["i4", "int", "i8", "double"]),
                number
            ),
            (
                Just("boolean"),
                prop::sample::select(vec!["0", "1", " 1", "true", ""]).prop_map(str::to_owned)
            ),
            (Just("string"), text()),
            (Just("dateTime.iso8601"), date),
            (Just("base64"), base64),
            (
                Just("nil"),
                prop::sample::select(vec![
                    "",
                    "junk",
                    "&#0;&foo;",
                    "<a>&foo;</a>",
                    "<a></b>",
                    "<x:y/>"
                ])
                .prop_map(str::to_owned)
            ),
            (Just("float"), text()),
        ];
        prop_oneof![
            6 => (typed, space(), space(), any::<bool>()).prop_map(|((tag, content), before, after, short)| {
                if content.is_empty() && short {
                    format!("<value>{before}<{tag}/>{after}</value>")
                } else {
                    format!("<value>{before}<{tag}>{content}</{tag}>{after}</value>")
                }
            }),
            2 => text().prop_map(|text| format!("<value>{text}</value>")),
            1 => Just("<value/>".to_owned()),
        ]
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(vec!["a", "b", "B", "é", "a ", " a", "methodName", "params"])
                .prop_map(str::to_owned),
            1 => text(),
        ]
    }

    fn value() -> impl Strategy<Value = String> {
        scalar().prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                (prop::collection::vec((inner.clone(), space()), 0..4), space(), 0..4u8).prop_map(
                    |(items, space, form)| {
                        let items: String = items.into_iter().map(|(v, s)| v + &s).collect();
                        match form {
                            0 if items.is_empty() => "<value><array/></value>".to_owned(),
                            1 if items.is_empty() => format!("<value><array>{space}<data/></array></value>"),
                            2 if items.is_empty() => "<value><array></array></value>".to_owned(),
                            _ => format!("<value><array>{space}<data>{space}{items}</data>{space}</array></value>"),
                        }
                    }
                ),
                (prop::collection::vec((name(), inner, space(), any::<bool>()), 0..4), space()).prop_map(
                    |(members, space)| {
                        let members: String = members
                            .into_iter()
                            .map(|(name, value, space, value_first)| {
                                let name = format!("<name>{name}</name>");
                                if value_first {
                                    format!("<member>{value}{space}{name}</member>")
                                } else {
                                    format!("<member>{space}{name}{value}</member>{space}")
                                }
                            })
                            .collect();
                        if members.is_empty() && space.is_empty() {
                            "<value><struct/></value>".to_owned()
                        } else {
                            format!("<value><struct>{space}{members}</struct></value>")
                        }
                    }
                ),
            ]
        })
    }

    /// A snippet inserted before one of the `<` of a document, to break it in some way.
    fn damage() -> impl Strategy<Value = Option<(usize, &'static str)>> {
        prop::option::weighted(
            0.3,
            (
                any::<usize>(),
                prop::sample::select(vec![
                    "<x/>",
                    "</value>",
                    "<value>",
                    "text",
                    "<string>a</string>",
                    "<i4>1</i4>",
                    "<name>n</name>",
                    "<data/>",
                    "<value>v</value>",
                    "<nil/>",
                    "<member><name>m</name><value/></member>",
                    "<params/>",
                    "<methodName>m</methodName>",
                    "<param><value/></param>",
                    "<!DOCTYPE x>",
                    "<?xml version='1.0'?>",
                    "</data>",
                ]),
            ),
        )
    }

    fn damaged(body: String, damage: Option<(usize, &str)>) -> String {
        let Some((pick, snippet)) = damage else {
            return body;
        };
        let positions: Vec<usize> = body.match_indices('<').map(|(i, _)| i).collect();
        let at = positions
            .get(pick % positions.len().max(1))
            .copied()
            .unwrap_or(0);
        format!("{}{snippet}{}", &body[..at], &body[at..])
    }

    fn call() -> impl Strategy<Value = String> {
        let declaration = prop_oneof![
            4 => Just(""),
            4 => Just("<?xml version=\"1.0\"?>"),
            4 => Just("<?xml version='1.0' encoding='UTF-8'?>\n"),
            1 => Just("<?xml version=\"1.1\"?>"),
        ];
        let method = prop::sample::select(vec![
            "put",
            "put",
            "get",
            "system.multicall",
            " put",
            "a&amp;b",
        ]);
        let params = prop::collection::vec((value(), space()), 0..4).prop_map(|params| {
            params
                .into_iter()
                .map(|(value, space)| format!("<param>{space}{value}</param>{space}"))
                .collect::<String>()
        });
        (declaration, method, params, space(), 0..5u8, damage()).prop_map(
            |(declaration, method, params, space, form, damage)| {
                let name = format!("<methodName>{method}</methodName>");
                let body = match form {
                    0 => format!("{declaration}<methodCall>{space}<params>{params}</params>{space}{name}</methodCall>"),
                    1 if params.is_empty() => format!("{declaration}<methodCall>{name}</methodCall>{space}"),
                    _ => format!("{declaration}{space}<methodCall>{space}{name}{space}<params>{space}{params}</params>{space}</methodCall>\n{space}"),
                };
                damaged(body, damage)
            },
        )
    }

    /// `system.multicall` calls of `put` and `get`, values of every kind inside.
    fn multicall() -> impl Strategy<Value = String> {
        let one = (
            prop::sample::select(vec!["put", "get", "put"]),
            prop::collection::vec(value(), 0..4),
            any::<bool>(),
        )
            .prop_map(|(method, params, params_first)| {
                let name = format!("<member><name>methodName</name><value>{method}</value></member>");
                let params = format!(
                    "<member><name>params</name><value><array><data>{}</data></array></value></member>",
                    params.concat()
                );
                if params_first {
                    format!("<value><struct>{params}{name}</struct></value>")
                } else {
                    format!("<value><struct>{name}{params}</struct></value>")
                }
            });
        (prop::collection::vec(one, 0..4), damage()).prop_map(|(calls, damage)| {
            let body = format!(
                "<methodCall><methodName>system.multicall</methodName><params><param><value><array><data>{}</data></array></value></param></params></methodCall>",
                calls.concat()
            );
            damaged(body, damage)
        })
    }

    proptest! {
        /// Wherever the reader answers for a shallow call, it answers as dxr does: the same
        /// refusals, the same method, the same parameters, put's value as the same text.
        #[test]
        fn reads_calls_as_dxr_does(body in call()) {
            if let Some(read) = read(&body) {
                prop_assert_eq!(read, read_by_dxr(&body), "{}", body);
            }
        }

        #[test]
        fn reads_multicalls_as_dxr_does(body in multicall()) {
            if let Some(read) = read(&body) {
                prop_assert_eq!(read, read_by_dxr(&body), "{}", body);
            }
        }

        /// The same for values alone, against `dxr::Value::from_xml`.
        #[test]
        fn reads_values_as_dxr_does(text in value()) {
            match value_text(&text) {
                Ok(read) => prop_assert_eq!(Some(read), by_dxr(&text), "{}", text),
                Err(Stop::Refused) => prop_assert_eq!(by_dxr(&text), None, "{}", text),
                Err(Stop::Unmodelled) => {}
            }
        }
    }

    /// The comparisons above would prove little if the reader left most calls to dxr.
    #[test]
    fn the_reader_answers_for_most_generated_calls() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = call();
        let (mut answered, mut accepted, total) = (0, 0, 2000);
        for _ in 0..total {
            let body = strategy.new_tree(&mut runner).expect("a call").current();
            if let Some(result) = read(&body) {
                answered += 1;
                accepted += usize::from(result.is_ok());
            }
        }
        assert!(
            answered * 10 >= total * 6,
            "the reader answered for {answered} of {total}"
        );
        assert!(accepted * 10 >= total * 2, "{accepted} of {total} accepted");
    }

    #[test]
    fn parse_call_keeps_puts_value_as_text_and_other_parameters_as_trees() {
        let deep = nested(300);
        let body = format!(
            "<methodCall><methodName>put</methodName><params><param><value>k</value></param><param>{deep}</param></params></methodCall>"
        );
        let call = parse_call(body.as_bytes()).expect("reads");
        assert_eq!(call.params[0], Param::Tree(Value::String("k".into())));
        assert_eq!(
            call.params[1],
            Param::Text(deep.replace("<int>7</int>", "<i4>7</i4>"))
        );
        // The key is a tree, and may not nest beyond the tree bound.
        let deep_key = body.replace("<value>k</value>", &nested(MAX_TREE_DEPTH + 1));
        let error = parse_call(deep_key.as_bytes()).expect_err("deep key");
        assert_eq!(error.fault_code(), crate::error::FAULT_INVALID_PARAMS);
        // A nil value stays nil, for put to refuse.
        let nil = body.replace(&deep, "<value><nil/></value>");
        assert_eq!(
            parse_call(nil.as_bytes()).expect("reads").params[1],
            Param::Tree(Value::Nil)
        );
        // In a multicall too, each put's value is text.
        let multicall = format!(
            "<methodCall><methodName>system.multicall</methodName><params><param><value><array><data><value><struct><member><name>methodName</name><value>put</value></member><member><name>params</name><value><array><data><value>k</value>{deep}</data></array></value></member></struct></value></data></array></value></param></params></methodCall>"
        );
        let call = parse_call(multicall.as_bytes()).expect("reads");
        let calls = multicall_calls(call.params).expect("multicall");
        let Some(Some(call)) = calls.into_iter().next() else {
            panic!("not a call");
        };
        assert_eq!(call.method, "put");
        assert_eq!(
            call.params[1],
            Param::Text(deep.replace("<int>7</int>", "<i4>7</i4>"))
        );
    }
}
