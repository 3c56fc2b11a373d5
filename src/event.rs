//! The transfer event (SPEC §2): fields, parsing from JSON, camelCase or the plugin's log line, validation.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;

use crate::sid::{ConversationSid, TaskSid, WorkerSid};

/// The marker the plugin's `logTransferEvent` prints before every event.
pub const LOG_MARKER: &str = "[ConversationTransfer]";

/// Where `LOG_MARKER` starts in `line`, with a searcher built once (a backlog asks per line).
pub fn find_marker(line: &str) -> Option<usize> {
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(LOG_MARKER));
    FINDER.find(line.as_bytes())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    Initiated,
    Notified,
    Accepted,
    Completed,
    Failed,
    TimedOut,
    Cancelled,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::Initiated,
        EventKind::Notified,
        EventKind::Accepted,
        EventKind::Completed,
        EventKind::Failed,
        EventKind::TimedOut,
        EventKind::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Initiated => "initiated",
            EventKind::Notified => "notified",
            EventKind::Accepted => "accepted",
            EventKind::Completed => "completed",
            EventKind::Failed => "failed",
            EventKind::TimedOut => "timed_out",
            EventKind::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .or(match s {
                // The plugin's and US spellings of the same events.
                "timedOut" | "timeout" => Some(EventKind::TimedOut),
                "canceled" => Some(EventKind::Cancelled),
                _ => None,
            })
    }

    /// Ends the transfer: the outcome is known once one of these arrives.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            EventKind::Completed | EventKind::Failed | EventKind::TimedOut | EventKind::Cancelled
        )
    }

    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransferType {
    Cold,
    Warm,
}

impl TransferType {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferType::Cold => "cold",
            TransferType::Warm => "warm",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetType {
    Worker,
    Queue,
}

impl TargetType {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetType::Worker => "worker",
            TargetType::Queue => "queue",
        }
    }
}

/// Error classes of SPEC §2, first match wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    BadRequest,
    AgentUnavailable,
    TargetNotFound,
    Other,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 4] = [
        ErrorClass::BadRequest,
        ErrorClass::AgentUnavailable,
        ErrorClass::TargetNotFound,
        ErrorClass::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::BadRequest => "bad_request",
            ErrorClass::AgentUnavailable => "agent_unavailable",
            ErrorClass::TargetNotFound => "target_not_found",
            ErrorClass::Other => "other",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TransferError {
    pub code: Option<i64>,
    pub status: Option<i64>,
    pub message: Option<String>,
}

impl TransferError {
    /// The seed's "TaskRouter error: Bad Request": status 400 or the words in the message.
    pub fn is_bad_request(&self) -> bool {
        self.status == Some(400)
            || self
                .message
                .as_deref()
                .is_some_and(|m| m.to_ascii_lowercase().contains("bad request"))
    }

    pub fn class(&self) -> ErrorClass {
        if self.is_bad_request() {
            ErrorClass::BadRequest
        } else if self.code == Some(20001) {
            ErrorClass::AgentUnavailable
        } else if self.code == Some(20404) {
            ErrorClass::TargetNotFound
        } else {
            ErrorClass::Other
        }
    }
}

/// A transfer id, at most 128 bytes. One of up to `TransferId::INLINE` bytes (a SID-shaped id
/// is 34) is kept inline, a longer one on the heap: nearly every event has one, and a `String`
/// each was an allocation and a free per event.
/// One text has one form (inline exactly when it fits), so the derived equality is the text's.
#[derive(Clone, PartialEq, Eq)]
pub struct TransferId(IdRepr);

#[derive(Clone, PartialEq, Eq)]
enum IdRepr {
    Inline(arrayvec::ArrayString<{ TransferId::INLINE }>),
    Heap(Box<str>),
}

impl TransferId {
    pub const INLINE: usize = 38;

    pub fn new(id: &str) -> TransferId {
        TransferId(match arrayvec::ArrayString::from(id) {
            Ok(inline) => IdRepr::Inline(inline),
            Err(_) => IdRepr::Heap(id.into()),
        })
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            IdRepr::Inline(id) => id,
            IdRepr::Heap(id) => id,
        }
    }
}

impl std::ops::Deref for TransferId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl From<&str> for TransferId {
    fn from(id: &str) -> TransferId {
        TransferId::new(id)
    }
}

/// One validated transfer event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    /// When it happened at the source, in milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    pub conversation_sid: ConversationSid,
    pub transfer_id: Option<TransferId>,
    pub transfer_type: Option<TransferType>,
    pub target_type: Option<TargetType>,
    pub error: Option<TransferError>,
    pub history_preserved: Option<bool>,
    /// Only honoured with the admin token.
    pub cbo: Option<String>,
    /// The TaskRouter task of this transfer, when the source knows it (the plugin may send
    /// `task_sid`; TaskRouter's own events always have it). Joins sources (SPEC §2b).
    pub task_sid: Option<TaskSid>,
    /// Who reported it.
    pub source: Source,
}

/// Where a transfer event came from (SPEC §2b). The plugin's family (`plugin`,
/// `serverless_logs`) reports what the plugin and functions log; TaskRouter's family
/// (`taskrouter_events`, `taskrouter_callback`, `event_streams`) is Twilio's own record, whose
/// outcome wins a disagreement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Source {
    #[default]
    Plugin,
    ServerlessLogs,
    TaskRouterEvents,
    TaskRouterCallback,
    EventStreams,
    /// The guard's own test transfers (SPEC §3), never counted as seen by a source.
    Probe,
}

impl Source {
    /// The sources that see transfers, in `transfers_seen_total`'s label order.
    pub const SEEING: [Source; 5] = [
        Source::Plugin,
        Source::ServerlessLogs,
        Source::TaskRouterEvents,
        Source::TaskRouterCallback,
        Source::EventStreams,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Plugin => "plugin",
            Source::ServerlessLogs => "serverless_logs",
            Source::TaskRouterEvents => "taskrouter_events",
            Source::TaskRouterCallback => "taskrouter_callback",
            Source::EventStreams => "event_streams",
            Source::Probe => "probe",
        }
    }

    /// Twilio's TaskRouter record.
    pub fn is_taskrouter(self) -> bool {
        matches!(
            self,
            Source::TaskRouterEvents | Source::TaskRouterCallback | Source::EventStreams
        )
    }
}

impl Event {
    /// The key that correlates one transfer's events: `transfer_id`, else `conversation_sid`.
    pub fn transfer_key(&self) -> &str {
        self.transfer_id
            .as_deref()
            .unwrap_or(self.conversation_sid.as_str())
    }
}

/// Why a line or object is not a transfer event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventError {
    /// Not JSON, or not a JSON object.
    Malformed(String),
    /// A field is missing or wrong.
    Field { field: &'static str, reason: String },
}

impl EventError {
    fn field(field: &'static str, reason: impl Into<String>) -> EventError {
        EventError::Field {
            field,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventError::Malformed(m) => write!(f, "not a JSON event object: {m}"),
            EventError::Field { field, reason } => write!(f, "field `{field}`: {reason}"),
        }
    }
}

impl std::error::Error for EventError {}

/// A JSON string borrowed from the input when it has no escapes (serde's own `Cow<str>` would
/// allocate inside an `Option`).
#[derive(Debug, PartialEq)]
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(Visitor)
    }
}

impl Text<'_> {
    fn into_owned(self) -> String {
        self.0.into_owned()
    }
}

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(untagged)]
enum RawNumber<'a> {
    Int(i64),
    #[serde(borrow)]
    Text(Text<'a>),
}

#[derive(Debug, Default, PartialEq, Deserialize)]
struct RawErrorObject<'a> {
    #[serde(default, borrow)]
    code: Option<RawNumber<'a>>,
    #[serde(default, borrow)]
    status: Option<RawNumber<'a>>,
    #[serde(default, borrow)]
    message: Option<Text<'a>>,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(untagged)]
enum RawError<'a> {
    #[serde(borrow)]
    Object(RawErrorObject<'a>),
    Message(Text<'a>),
}

#[derive(Debug, Default, PartialEq, Deserialize)]
struct RawEvent<'a> {
    #[serde(default, borrow, alias = "eventType", alias = "event_type")]
    event: Option<Text<'a>>,
    #[serde(default, borrow)]
    timestamp: Option<Text<'a>>,
    #[serde(default, borrow, alias = "conversationSid")]
    conversation_sid: Option<Text<'a>>,
    #[serde(default, borrow, alias = "transferId")]
    transfer_id: Option<Text<'a>>,
    #[serde(default, borrow, alias = "transferType")]
    transfer_type: Option<Text<'a>>,
    #[serde(default, borrow, alias = "targetType")]
    target_type: Option<Text<'a>>,
    #[serde(default, borrow, alias = "fromAgent")]
    from_agent: Option<Text<'a>>,
    #[serde(default, borrow, alias = "toTarget")]
    to_target: Option<Text<'a>>,
    #[serde(default, borrow)]
    error: Option<RawError<'a>>,
    #[serde(default, alias = "historyPreserved")]
    history_preserved: Option<bool>,
    #[serde(default, borrow)]
    cbo: Option<Text<'a>>,
    #[serde(default, borrow, alias = "taskSid")]
    task_sid: Option<Text<'a>>,
}

/// Parses one JSON object.
pub fn parse_json(text: &str) -> Result<Event, EventError> {
    parse_with_kind(text, None)
}

/// Parses one line: the plugin's `[ConversationTransfer] <event>: {json}` or a bare JSON object.
pub fn parse_line(line: &str) -> Result<Event, EventError> {
    let line = line.trim();
    if line.starts_with('{') {
        return parse_json(line);
    }
    if let Some(rest) = find_marker(line).map(|i| &line[i + LOG_MARKER.len()..]) {
        let (name, json) = rest.split_once(':').ok_or_else(|| {
            EventError::Malformed(format!("log line has no `<event>:` after {LOG_MARKER}"))
        })?;
        parse_with_kind(json.trim(), Some(name.trim()))
    } else {
        Err(EventError::Malformed(format!(
            "neither a JSON object nor a {LOG_MARKER} log line"
        )))
    }
}

fn parse_with_kind(text: &str, line_kind: Option<&str>) -> Result<Event, EventError> {
    let raw = match scan::event(text) {
        Some(raw) => raw,
        None => match serde_json::from_str::<RawEvent>(text) {
            Ok(raw) => raw,
            Err(err) => return Err(describe_json_error(text, err)),
        },
    };
    validate(raw, line_kind)
}

/// A scanner for the shape events nearly always have: one flat object of strings without
/// escapes, booleans, nulls and short integers (and `error` as such an object or a string).
/// It gives exactly what serde_json gives for those, in about 70 % of serde_json's
/// instructions on typical events (BENCHMARKS.md); anything else
/// (an escape, a nested value, a duplicate key, bad JSON) returns `None` and serde_json parses
/// the text, and explains what is wrong with it.
mod scan {
    use std::borrow::Cow;

    use super::{RawError, RawErrorObject, RawEvent, RawNumber, Text};

    struct Scanner<'a> {
        b: &'a [u8],
        text: &'a str,
        i: usize,
    }

    impl<'a> Scanner<'a> {
        fn ws(&mut self) {
            while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
                self.i += 1;
            }
        }

        fn eat(&mut self, c: u8) -> Option<()> {
            self.ws();
            (self.b.get(self.i) == Some(&c)).then(|| self.i += 1)
        }

        fn peek(&mut self) -> Option<u8> {
            self.ws();
            self.b.get(self.i).copied()
        }

        /// A string without escapes or control characters, borrowed.
        #[inline]
        fn string(&mut self) -> Option<&'a str> {
            self.eat(b'"')?;
            let start = self.i;
            let end = string_end(self.b, start)?;
            self.i = end + 1;
            Some(&self.text[start..end])
        }

        fn literal(&mut self, word: &str) -> Option<()> {
            self.b[self.i..]
                .starts_with(word.as_bytes())
                .then(|| self.i += word.len())
        }

        /// `null` (None) or a string. Inlined: its answer, returned through memory, was read
        /// back wider than it was written (a store-forwarding stall on every field).
        #[inline(always)]
        fn text(&mut self) -> Option<Option<Text<'a>>> {
            match self.peek()? {
                b'n' => self.literal("null").map(|_| None),
                _ => self.string().map(|s| Some(Text(Cow::Borrowed(s)))),
            }
        }

        fn boolean(&mut self) -> Option<Option<bool>> {
            match self.peek()? {
                b'n' => self.literal("null").map(|_| None),
                b't' => self.literal("true").map(|_| Some(true)),
                b'f' => self.literal("false").map(|_| Some(false)),
                _ => None,
            }
        }

        /// An integer as JSON writes one (no leading zeros), within i64.
        fn integer(&mut self) -> Option<i64> {
            self.ws();
            let negative = self.b.get(self.i) == Some(&b'-');
            if negative {
                self.i += 1;
            }
            let start = self.i;
            let mut n: i64 = 0;
            while let Some(d @ b'0'..=b'9') = self.b.get(self.i) {
                n = n.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
                self.i += 1;
            }
            let digits = self.i - start;
            // serde_json reads `-0` as a float.
            if digits == 0 || (digits > 1 && self.b[start] == b'0') || (negative && n == 0) {
                return None;
            }
            if let Some(b'.' | b'e' | b'E') = self.b.get(self.i) {
                return None;
            }
            Some(if negative { -n } else { n })
        }

        fn number(&mut self) -> Option<Option<RawNumber<'a>>> {
            match self.peek()? {
                b'n' => self.literal("null").map(|_| None),
                b'"' => self
                    .string()
                    .map(|s| Some(RawNumber::Text(Text(Cow::Borrowed(s))))),
                _ => self.integer().map(|n| Some(RawNumber::Int(n))),
            }
        }

        /// A value of a field we do not read: a scalar; nested values go to serde_json.
        fn skip(&mut self) -> Option<()> {
            match self.peek()? {
                b'"' => self.string().map(|_| ()),
                b'n' => self.literal("null"),
                b't' => self.literal("true"),
                b'f' => self.literal("false"),
                _ => self.integer().map(|_| ()),
            }
        }

        /// `{ "key": value, … }`, calling `field` for each key; `None` on anything unexpected.
        fn object(
            &mut self,
            mut field: impl FnMut(&mut Self, &'a str) -> Option<()>,
        ) -> Option<()> {
            self.eat(b'{')?;
            if self.peek()? == b'}' {
                self.i += 1;
                return Some(());
            }
            loop {
                let key = self.string()?;
                self.eat(b':')?;
                field(self, key)?;
                match self.peek()? {
                    b',' => self.i += 1,
                    b'}' => {
                        self.i += 1;
                        return Some(());
                    }
                    _ => return None,
                }
            }
        }
    }

    /// The index of the quote that ends the string starting at `i`; `None` at a backslash, a
    /// control character or the end of the input. Eight bytes at a time: a byte is flagged
    /// when it equals `"` or `\\`, or is below 0x20 (the lowest flag is exact).
    fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
        while let Some(chunk) = b.get(i..i + 8) {
            let w = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
            let flags = zero(w ^ (ONES * u64::from(b'"')))
                | zero(w ^ (ONES * u64::from(b'\\')))
                | (w.wrapping_sub(ONES * 0x20) & !w & HIGH);
            if flags != 0 {
                let at = i + (flags.trailing_zeros() / 8) as usize;
                return (b[at] == b'"').then_some(at);
            }
            i += 8;
        }
        loop {
            match *b.get(i)? {
                b'"' => return Some(i),
                b'\\' | 0..0x20 => return None,
                _ => i += 1,
            }
        }
    }

    #[cfg(test)]
    #[test]
    fn string_end_finds_what_a_byte_by_byte_search_finds_at_every_offset() {
        let naive = |b: &[u8], i: usize| {
            b[i..]
                .iter()
                .position(|c| *c == b'"' || *c == b'\\' || *c < 0x20)
                .map(|p| i + p)
                .filter(|at| b[*at] == b'"')
        };
        for special in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
            for len in 0..48 {
                for at in 0..=len {
                    // `é` and 0x7f are ordinary bytes; so is 0x20.
                    let mut b: Vec<u8> = "aé\x7f b".bytes().cycle().take(len).collect();
                    if at < len {
                        b[at] = special;
                    }
                    // A closing quote after it: found only when nothing before it stops.
                    b.push(b'"');
                    for start in 0..=len {
                        assert_eq!(
                            string_end(&b, start),
                            naive(&b, start),
                            "{special:#x} at {at} of {len}, from {start}"
                        );
                    }
                }
            }
        }
    }

    /// Sets a field once; a second time (a duplicate key, which serde_json refuses) gives up.
    fn once<T>(seen: &mut u32, bit: u32, slot: &mut T, value: T) -> Option<()> {
        if *seen & bit != 0 {
            return None;
        }
        *seen |= bit;
        *slot = value;
        Some(())
    }

    fn error_object<'a>(s: &mut Scanner<'a>) -> Option<RawErrorObject<'a>> {
        let mut e = RawErrorObject::default();
        let mut seen = 0;
        s.object(|s, key| match key {
            "code" => {
                let v = s.number()?;
                once(&mut seen, 1, &mut e.code, v)
            }
            "status" => {
                let v = s.number()?;
                once(&mut seen, 2, &mut e.status, v)
            }
            "message" => {
                let v = s.text()?;
                once(&mut seen, 4, &mut e.message, v)
            }
            _ => s.skip(),
        })?;
        Some(e)
    }

    pub(super) fn event(text: &str) -> Option<RawEvent<'_>> {
        let mut s = Scanner {
            b: text.as_bytes(),
            text,
            i: 0,
        };
        let mut raw = RawEvent::default();
        let mut seen = 0u32;
        s.object(|s, key| {
            let (bit, slot) = match key {
                "event" | "eventType" | "event_type" => (1, &mut raw.event),
                "timestamp" => (2, &mut raw.timestamp),
                "conversation_sid" | "conversationSid" => (4, &mut raw.conversation_sid),
                "transfer_id" | "transferId" => (8, &mut raw.transfer_id),
                "transfer_type" | "transferType" => (16, &mut raw.transfer_type),
                "target_type" | "targetType" => (32, &mut raw.target_type),
                "from_agent" | "fromAgent" => (64, &mut raw.from_agent),
                "to_target" | "toTarget" => (128, &mut raw.to_target),
                "cbo" => (256, &mut raw.cbo),
                "task_sid" | "taskSid" => (2048, &mut raw.task_sid),
                "history_preserved" | "historyPreserved" => {
                    let v = s.boolean()?;
                    return once(&mut seen, 512, &mut raw.history_preserved, v);
                }
                "error" => {
                    let v = match s.peek()? {
                        b'{' => Some(RawError::Object(error_object(s)?)),
                        b'"' => Some(RawError::Message(Text(Cow::Borrowed(s.string()?)))),
                        b'n' => s.literal("null").map(|_| None)?,
                        _ => return None,
                    };
                    return once(&mut seen, 1024, &mut raw.error, v);
                }
                _ => return s.skip(),
            };
            let v = s.text()?;
            once(&mut seen, bit, slot, v)
        })?;
        s.ws();
        (s.i == s.b.len()).then_some(raw)
    }
}

/// Turns serde's error into one that names the field, re-parsing only on this cold path.
fn describe_json_error(text: &str, err: serde_json::Error) -> EventError {
    if err.is_syntax() || err.is_eof() {
        return EventError::Malformed(err.to_string());
    }
    let mut de = serde_json::Deserializer::from_str(text);
    match serde_path_to_error::deserialize::<_, RawEvent>(&mut de) {
        Err(e) if !e.path().to_string().is_empty() && e.path().to_string() != "." => {
            EventError::Field {
                field: leak_field_name(&e.path().to_string()),
                reason: plain(&e.inner().to_string()),
            }
        }
        _ => EventError::Malformed(err.to_string()),
    }
}

/// serde's words without our type names: a user reads "expected …", not "enum RawError".
fn plain(reason: &str) -> String {
    if reason.contains("untagged enum") {
        let at = reason.find(" at line ").map_or("", |i| &reason[i..]);
        return format!(
            "expected an object {{\"code\", \"status\", \"message\"}} or a message string{at}"
        );
    }
    reason.to_string()
}

/// Maps a serde path back onto our field names so the error can borrow a static name.
fn leak_field_name(path: &str) -> &'static str {
    const NAMES: [&str; 12] = [
        "event",
        "timestamp",
        "conversation_sid",
        "transfer_id",
        "transfer_type",
        "target_type",
        "from_agent",
        "to_target",
        "error",
        "history_preserved",
        "cbo",
        "task_sid",
    ];
    let head = path.split('.').next().unwrap_or(path);
    let snake: String = head
        .chars()
        .flat_map(|c| {
            if c.is_ascii_uppercase() {
                vec!['_', c.to_ascii_lowercase()]
            } else {
                vec![c]
            }
        })
        .collect();
    let snake = if snake == "event_type" {
        "event".to_string()
    } else {
        snake
    };
    NAMES.into_iter().find(|n| *n == snake).unwrap_or("(event)")
}

/// The common shapes `2026-11-26T01:00:00Z`, `…:00.123Z`, `…:00+01:00` in a few dozen
/// instructions; anything else (or anything odd) goes to chrono, which also explains errors.
fn fast_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        b[r].iter().try_fold(0i64, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=28).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        // Days 29-31 are valid only in some months: let chrono judge them.
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || i - start > 9 {
            return None;
        }
        let digits = num(start..(start + 3).min(i))?;
        millis = digits * 10i64.pow(3 - ((start + 3).min(i) - start) as u32);
    }
    let offset_secs = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [*h1, *h2, *m1, *m2];
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let (h, m) = (
                i64::from(h1 - b'0') * 10 + i64::from(h2 - b'0'),
                i64::from(m1 - b'0') * 10 + i64::from(m2 - b'0'),
            );
            if h > 23 || m > 59 {
                return None;
            }
            let off = h * 3600 + m * 60;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs) * 1000 + millis)
}

fn number(field: &'static str, n: Option<RawNumber>) -> Result<Option<i64>, EventError> {
    match n {
        None => Ok(None),
        Some(RawNumber::Int(i)) => Ok(Some(i)),
        Some(RawNumber::Text(t)) => t
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| EventError::field(field, format!("{:?} is not an integer", &*t))),
    }
}

fn validate(raw: RawEvent, line_kind: Option<&str>) -> Result<Event, EventError> {
    let name = match (raw.event.as_deref(), line_kind) {
        (Some(body), Some(line)) if EventKind::parse(body) != EventKind::parse(line) => {
            return Err(EventError::field(
                "event",
                format!("the log line says {line:?} but the object says {body:?}"),
            ));
        }
        (Some(name), _) | (None, Some(name)) => name,
        (None, None) => return Err(EventError::field("event", "missing")),
    };
    let kind = EventKind::parse(name).ok_or_else(|| {
        EventError::field(
            "event",
            format!(
                "{name:?} is not one of initiated, notified, accepted, completed, failed, timed_out, cancelled"
            ),
        )
    })?;

    let ts = raw
        .timestamp
        .ok_or_else(|| EventError::field("timestamp", "missing"))?;
    let timestamp_ms = match fast_rfc3339_ms(&ts) {
        Some(ms) => ms,
        None => chrono::DateTime::parse_from_rfc3339(&ts)
            .map_err(|e| {
                EventError::field(
                    "timestamp",
                    format!("{ts:?} is not RFC 3339 with an offset ({e})"),
                )
            })?
            .timestamp_millis(),
    };

    let conversation = raw
        .conversation_sid
        .ok_or_else(|| EventError::field("conversation_sid", "missing"))?;
    let conversation_sid = ConversationSid::parse(&conversation)
        .map_err(|e| EventError::field("conversation_sid", e.to_string()))?;

    let transfer_id = match raw.transfer_id {
        Some(id) if id.trim().is_empty() => {
            return Err(EventError::field("transfer_id", "empty"));
        }
        Some(id) if id.len() > 128 => {
            return Err(EventError::field("transfer_id", "longer than 128 bytes"));
        }
        Some(id) => Some(TransferId::new(&id)),
        None => None,
    };

    let transfer_type = match raw.transfer_type.as_deref() {
        None => None,
        Some("cold") => Some(TransferType::Cold),
        Some("warm") => Some(TransferType::Warm),
        Some(other) => {
            return Err(EventError::field(
                "transfer_type",
                format!("{other:?} is not cold or warm"),
            ));
        }
    };
    let target_type = match raw.target_type.as_deref() {
        None => None,
        Some("worker") => Some(TargetType::Worker),
        Some("queue") => Some(TargetType::Queue),
        Some(other) => {
            return Err(EventError::field(
                "target_type",
                format!("{other:?} is not worker or queue"),
            ));
        }
    };
    if kind == EventKind::Initiated {
        if transfer_type.is_none() {
            return Err(EventError::field("transfer_type", "required on initiated"));
        }
        if target_type.is_none() {
            return Err(EventError::field("target_type", "required on initiated"));
        }
    }
    if let Some(agent) = raw.from_agent.as_deref() {
        WorkerSid::parse(agent).map_err(|e| EventError::field("from_agent", e.to_string()))?;
    }
    if let Some(target) = raw.to_target.as_deref() {
        if target.trim().is_empty() {
            return Err(EventError::field("to_target", "empty"));
        }
        if target_type == Some(TargetType::Worker) {
            WorkerSid::parse(target).map_err(|e| EventError::field("to_target", e.to_string()))?;
        }
    }

    let error = match raw.error {
        None => None,
        Some(RawError::Message(message)) => Some(TransferError {
            message: Some(message.into_owned()),
            ..TransferError::default()
        }),
        Some(RawError::Object(obj)) => Some(TransferError {
            code: number("error", obj.code)?,
            status: number("error", obj.status)?,
            message: obj.message.map(Text::into_owned),
        }),
    };
    if kind == EventKind::Failed && error.is_none() {
        return Err(EventError::field("error", "required on failed"));
    }
    if kind == EventKind::Completed && raw.history_preserved.is_none() {
        // Absent means the source did not say; only an explicit `false` is a loss.
    }

    let task_sid = match raw.task_sid.as_deref() {
        None => None,
        Some(t) => {
            Some(TaskSid::parse(t).map_err(|e| EventError::field("task_sid", e.to_string()))?)
        }
    };

    Ok(Event {
        kind,
        timestamp_ms,
        conversation_sid,
        transfer_id,
        transfer_type,
        target_type,
        error,
        history_preserved: raw.history_preserved,
        cbo: raw.cbo.map(Text::into_owned),
        task_sid,
        source: Source::Plugin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CH: &str = "CH0123456789abcdef0123456789abcdef";

    #[test]
    fn a_transfer_id_reads_back_as_parsed_inline_or_on_the_heap() {
        // Around the inline size, up to the 128-byte limit, with a character of two bytes
        // and one of three; the empty id too (refused by validation, but representable).
        let mut ids = vec![
            String::new(),
            "KI0123456789abcdef0123456789abcdef".to_string(),
        ];
        for len in TransferId::INLINE - 2..=TransferId::INLINE + 2 {
            ids.push("x".repeat(len));
            ids.push(format!("é{}", "y".repeat(len - 2)));
            ids.push(format!("{}€", "z".repeat(len - 3)));
        }
        ids.push("w".repeat(128));
        for id in &ids {
            let t = TransferId::new(id);
            assert_eq!(t.as_str(), id);
            assert_eq!(format!("{t:?}"), format!("{id:?}"));
            assert_eq!(t.clone(), t);
            let line = format!(
                r#"{{"event":"accepted","timestamp":"2026-11-26T01:00:00Z","conversation_sid":"{CH}","transfer_id":"{id}"}}"#
            );
            match parse_line(&line) {
                Ok(e) => {
                    assert_eq!(e.transfer_id.as_deref(), Some(id.as_str()));
                    assert_eq!(e.transfer_key(), id);
                }
                Err(err) => assert!(id.trim().is_empty(), "{id:?}: {err}"),
            }
        }
        assert_ne!(TransferId::new("a"), TransferId::new("b"));
        assert_ne!(TransferId::new(&"a".repeat(60)), TransferId::new("a"));
    }

    #[test]
    fn plugin_log_line_with_bad_request_is_classed_bad_request() {
        let line = format!(
            r#"[ConversationTransfer] failed: {{"timestamp": "2026-11-26T01:00:00.000Z", "conversationSid": "{CH}", "error": {{"message": "TaskRouter error: Bad Request"}}}}"#
        );
        let event = parse_line(&line).unwrap();
        assert_eq!(event.kind, EventKind::Failed);
        assert_eq!(event.conversation_sid.as_str(), CH);
        assert_eq!(event.error.unwrap().class(), ErrorClass::BadRequest);
    }

    #[test]
    fn snake_case_and_camel_case_give_the_same_event() {
        let snake = format!(
            r#"{{"event":"initiated","timestamp":"2026-11-26T01:00:00+01:00","conversation_sid":"{CH}","transfer_type":"warm","target_type":"queue","to_target":"support"}}"#
        );
        let camel = format!(
            r#"{{"eventType":"initiated","timestamp":"2026-11-26T01:00:00+01:00","conversationSid":"{CH}","transferType":"warm","targetType":"queue","toTarget":"support"}}"#
        );
        assert_eq!(parse_json(&snake).unwrap(), parse_json(&camel).unwrap());
        assert_eq!(
            parse_json(&snake).unwrap().timestamp_ms,
            chrono::DateTime::parse_from_rfc3339("2026-11-26T00:00:00Z")
                .unwrap()
                .timestamp_millis()
        );
    }

    #[test]
    fn error_classes_follow_first_match() {
        let e = |code, status, message: &str| TransferError {
            code,
            status,
            message: Some(message.into()),
        };
        assert_eq!(
            e(Some(20001), Some(400), "x").class(),
            ErrorClass::BadRequest
        );
        assert_eq!(
            e(Some(20001), None, "busy").class(),
            ErrorClass::AgentUnavailable
        );
        assert_eq!(
            e(Some(20404), None, "gone").class(),
            ErrorClass::TargetNotFound
        );
        assert_eq!(e(None, Some(500), "boom").class(), ErrorClass::Other);
        assert_eq!(e(None, None, "bad REQUEST").class(), ErrorClass::BadRequest);
    }

    #[test]
    fn every_rejection_names_its_field() {
        let cases = [
            (
                r#"{"timestamp":"2026-11-26T01:00:00Z","conversation_sid":"CH"}"#,
                "event",
            ),
            (
                &*format!(r#"{{"event":"completed","conversation_sid":"{CH}"}}"#),
                "timestamp",
            ),
            (
                &*format!(
                    r#"{{"event":"completed","timestamp":"yesterday","conversation_sid":"{CH}"}}"#
                ),
                "timestamp",
            ),
            (
                &*format!(
                    r#"{{"event":"completed","timestamp":"2026-11-26T01:00:00","conversation_sid":"{CH}"}}"#
                ),
                "timestamp",
            ),
            (
                r#"{"event":"completed","timestamp":"2026-11-26T01:00:00Z","conversation_sid":"CH12"}"#,
                "conversation_sid",
            ),
            (
                &*format!(
                    r#"{{"event":"initiated","timestamp":"2026-11-26T01:00:00Z","conversation_sid":"{CH}","target_type":"queue"}}"#
                ),
                "transfer_type",
            ),
            (
                &*format!(
                    r#"{{"event":"initiated","timestamp":"2026-11-26T01:00:00Z","conversation_sid":"{CH}","transfer_type":"cold","target_type":"team"}}"#
                ),
                "target_type",
            ),
            (
                &*format!(
                    r#"{{"event":"failed","timestamp":"2026-11-26T01:00:00Z","conversation_sid":"{CH}"}}"#
                ),
                "error",
            ),
            (
                &*format!(
                    r#"{{"event":"exploded","timestamp":"2026-11-26T01:00:00Z","conversation_sid":"{CH}"}}"#
                ),
                "event",
            ),
            (
                &*format!(r#"{{"event":"completed","timestamp":12,"conversation_sid":"{CH}"}}"#),
                "timestamp",
            ),
            (
                &*format!(
                    r#"{{"event":"completed","timestamp":"2026-11-26T01:00:00Z","conversation_sid":"{CH}","history_preserved":"no"}}"#
                ),
                "history_preserved",
            ),
            (
                &*format!(
                    r#"{{"event":"completed","timestamp":"2026-11-26T01:00:00Z","conversation_sid":"{CH}","fromAgent":"bob"}}"#
                ),
                "from_agent",
            ),
        ];
        for (text, field) in cases {
            match parse_json(text) {
                Err(EventError::Field { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: expected a `{field}` rejection, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_fast_timestamp_path_agrees_with_chrono() {
        for ts in [
            "2026-11-26T01:00:00Z",
            "2026-11-26T01:00:00.123Z",
            "2026-11-26T01:00:00.1Z",
            "2026-11-26T01:00:00.123456789+05:30",
            "2024-02-28T23:59:59-08:00",
            "1999-12-28T23:59:59.999Z",
            "2000-03-01T00:00:00+00:00",
        ] {
            let chrono = chrono::DateTime::parse_from_rfc3339(ts)
                .unwrap()
                .timestamp_millis();
            assert_eq!(fast_rfc3339_ms(ts), Some(chrono), "{ts}");
        }
        for odd in [
            "2026-02-30T00:00:00Z",
            "2026-11-26T01:00:00",
            "2026-11-26 01:00:00Z",
            "2026-13-01T00:00:00Z",
        ] {
            assert_eq!(fast_rfc3339_ms(odd), None, "{odd}");
        }
    }

    #[test]
    fn escaped_strings_parse_like_plain_ones() {
        let plain = format!(
            r#"{{"event":"failed","timestamp":"2026-11-26T01:00:00Z","conversation_sid":"{CH}","transfer_id":"a/b","error":{{"message":"Bad Request"}}}}"#
        );
        let escaped = format!(
            r#"{{"event":"failed","timestamp":"2026-11-26T01:00:00Z","conversation_sid":"C{}","transfer_id":"a\/b","error":{{"message":"Bad Request"}}}}"#,
            &CH[1..]
        );
        assert_eq!(parse_json(&plain).unwrap(), parse_json(&escaped).unwrap());
    }

    #[test]
    fn log_line_kind_must_agree_with_the_object() {
        let line = format!(
            r#"[ConversationTransfer] completed: {{"event":"failed","timestamp":"2026-11-26T01:00:00Z","conversationSid":"{CH}","error":"x"}}"#
        );
        let err = parse_line(&line).unwrap_err();
        assert!(err.to_string().contains("field `event`"), "{err}");
    }

    #[test]
    fn other_console_output_is_malformed() {
        assert!(matches!(
            parse_line("Transfer failed: TypeError"),
            Err(EventError::Malformed(_))
        ));
        assert!(matches!(
            parse_json("{\"event\": "),
            Err(EventError::Malformed(_))
        ));
    }

    /// Edge cases of the shapes the scanner takes and the ones it must hand to serde_json.
    const EDGE_CASES: &[&str] = &[
        r#"{"event":"failed","timestamp":"2026-11-26T01:00:00Z","conversation_sid":"CH0123456789abcdef0123456789abcdef","error":{"code":20001,"status":400,"message":"TaskRouter error: Bad Request"}}"#,
        r#"{"event":"failed","error":"TaskRouter error: Bad Request"}"#,
        r#"{"event":"failed","error":null,"cbo":null}"#,
        r#"{"error":{"code":"20001","status":-400}}"#,
        r#"{"error":{"code":-0}}"#,
        r#"{"error":{"code":007}}"#,
        r#"{"error":{"code":1e3}}"#,
        r#"{"error":{"code":1.0}}"#,
        r#"{"error":{"code":9223372036854775807}}"#,
        r#"{"error":{"code":9223372036854775808}}"#,
        r#"{"error":{"code":1,"code":2}}"#,
        r#"{"error":{}}"#,
        r#"{"error":{"extra":true,"more":null,"n":5}}"#,
        r#"{"error":{"nested":{"a":1}}}"#,
        r#"{"error":[1]}"#,
        r#"{"error":7}"#,
        r#"{"history_preserved":false}"#,
        r#"{"historyPreserved":true,"history_preserved":true}"#,
        r#"{"history_preserved":null}"#,
        r#"{"history_preserved":"false"}"#,
        r#"{"event":"initiated","eventType":"initiated"}"#,
        r#"{"event":"a \"quoted\" word"}"#,
        r#"{"event":"tab\there"}"#,
        "{\"event\":\"raw\ttab\"}",
        "{\"event\":\"raw\u{1}control\"}",
        " \t\r\n{ \"event\" : \"initiated\" ,\n\"timestamp\":\"x\" } \n",
        r#"{"meta":{"a":1},"event":"initiated"}"#,
        r#"{"tags":["a"],"event":"initiated"}"#,
        r#"{"n":-1.5e3,"event":"initiated"}"#,
        r#"{"event":"initiated"} x"#,
        r#"{"event":"initiated",}"#,
        r#"{"event":"initiated""timestamp":"x"}"#,
        r#"{}"#,
        r#"{"reason":"café ☕","event":"notified"}"#,
        r#"{"ev\u0065nt":"initiated"}"#,
        r#"{"event":nul}"#,
        r#"{"event":true}"#,
        r#"{"cbo":"nss","event":"completed","history_preserved":false,"notes":""}"#,
        r#"[{"event":"initiated"}]"#,
        r#""event""#,
    ];

    /// One random edit of an ASCII line: a byte deleted, a JSON-ish byte inserted, or a
    /// stretch repeated (which makes duplicate keys).
    fn mutate(line: &str, rng: &mut fastrand::Rng) -> String {
        let mut b = line.as_bytes().to_vec();
        if b.is_empty() {
            return String::new();
        }
        let at = rng.usize(0..b.len());
        match rng.u8(0..3) {
            0 => {
                b.remove(at);
            }
            1 => {
                let bytes = b"\"\\{}[],: 1-0.enft\n\x01";
                b.insert(at, bytes[rng.usize(0..bytes.len())]);
            }
            _ => {
                let end = rng.usize(at..=b.len().min(at + 80));
                let piece = b[at..end].to_vec();
                b.splice(at..at, piece);
            }
        }
        String::from_utf8(b).unwrap_or_default()
    }

    #[test]
    fn the_scanner_gives_exactly_what_serde_json_gives_or_hands_the_text_over() {
        let mut lines: Vec<String> = crate::bench::lines(2000, 1_800_000_000_000);
        let typical = lines.len();
        lines.extend(EDGE_CASES.iter().map(|s| s.to_string()));
        let mut rng = fastrand::Rng::with_seed(11);
        let (mut scanned, mut handed_over) = (0, 0);
        for (n, line) in lines.iter().enumerate() {
            let variants: Vec<String> = std::iter::once(line.clone())
                .chain((0..30).map(|_| mutate(line, &mut rng)))
                .collect();
            for (v, text) in variants.iter().enumerate() {
                let serde = serde_json::from_str::<RawEvent>(text).ok();
                match scan::event(text) {
                    Some(fast) => {
                        scanned += 1;
                        assert_eq!(Some(&fast), serde.as_ref(), "{text}");
                    }
                    None => {
                        handed_over += 1;
                        // Every typical line, as written, takes the fast path.
                        assert!(v > 0 || n >= typical, "{text}");
                    }
                }
            }
        }
        assert!(
            scanned > 30_000 && handed_over > 10_000,
            "{scanned} {handed_over}"
        );
    }
}

#[cfg(test)]
mod messages {
    /// What a user reads about a bad field names the field and what was expected, never one of
    /// our types.
    #[test]
    fn rejections_name_no_internal_type() {
        for (body, want) in [
            (
                r#"{"event":"failed","timestamp":"2026-11-26T01:00:00Z","conversation_sid":"CH0123456789abcdef0123456789abcdef","error":5}"#,
                "field `error`: expected an object {\"code\", \"status\", \"message\"} or a message string",
            ),
            (
                r#"{"event":"failed","timestamp":"2026-11-26T01:00:00Z","conversation_sid":"CH0123456789abcdef0123456789abcdef","error":{"code":"x"}}"#,
                "field `error`: \"x\" is not an integer",
            ),
            (
                r#"{"event":7,"timestamp":"2026-11-26T01:00:00Z","conversation_sid":"CH0123456789abcdef0123456789abcdef"}"#,
                "field `event`: invalid type: integer `7`, expected a string",
            ),
        ] {
            let got = super::parse_json(body).unwrap_err().to_string();
            assert!(got.starts_with(want), "{got}");
            for internal in ["Raw", "Text(", "enum", "struct"] {
                assert!(!got.contains(internal), "{got}");
            }
        }
    }
}
