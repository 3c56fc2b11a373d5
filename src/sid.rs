//! Twilio SIDs as types that cannot hold a malformed value.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

/// A kind of Twilio resource, named by its two-letter SID prefix.
pub trait SidKind {
    const PREFIX: &'static str;
    const NAME: &'static str;
}

macro_rules! sid_kinds {
    ($($kind:ident $alias:ident $prefix:literal $name:literal;)*) => {$(
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $kind;
        impl SidKind for $kind {
            const PREFIX: &'static str = $prefix;
            const NAME: &'static str = $name;
        }
        pub type $alias = Sid<$kind>;
    )*};
}

sid_kinds! {
    Account AccountSid "AC" "account";
    ApiKey ApiKeySid "SK" "API key";
    Workspace WorkspaceSid "WS" "workspace";
    Workflow WorkflowSid "WW" "workflow";
    Conversation ConversationSid "CH" "conversation";
    Worker WorkerSid "WK" "worker";
    Service ServiceSid "ZS" "serverless service";
    Environment EnvironmentSid "ZE" "serverless environment";
    Queue QueueSid "WQ" "task queue";
    Task TaskSid "WT" "task";
}

/// Total length of every Twilio SID: two letters and 32 hexadecimal digits.
pub const SID_LEN: usize = 34;

/// Why a string is not a SID of the expected kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SidError {
    #[error("{name} SID is empty")]
    Empty { name: &'static str },
    #[error("{name} SID {value:?} has {len} characters, expected {SID_LEN}")]
    Length {
        name: &'static str,
        value: String,
        len: usize,
    },
    #[error("{name} SID {value:?} must start with {prefix}")]
    Prefix {
        name: &'static str,
        value: String,
        prefix: &'static str,
    },
    #[error("{name} SID {value:?} must be {prefix} followed by 32 hexadecimal digits")]
    NotHex {
        name: &'static str,
        value: String,
        prefix: &'static str,
    },
}

/// Which bytes are not hexadecimal digits, for a check without a branch per byte (every
/// event carries three or four SIDs; a backlog checks millions).
const NOT_HEX: [bool; 256] = {
    let mut table = [true; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = !(b as u8).is_ascii_hexdigit();
        b += 1;
    }
    table
};

fn all_hex(bytes: &[u8]) -> bool {
    !bytes
        .iter()
        .fold(false, |bad, b| bad | NOT_HEX[*b as usize])
}

/// A validated SID of kind `K`, stored inline (SIDs are ASCII and fixed-size).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sid<K> {
    bytes: [u8; SID_LEN],
    kind: PhantomData<K>,
}

impl<K: SidKind> Sid<K> {
    pub fn parse(value: &str) -> Result<Self, SidError> {
        let name = K::NAME;
        if value.is_empty() {
            return Err(SidError::Empty { name });
        }
        if value.len() != SID_LEN {
            return Err(SidError::Length {
                name,
                value: shorten(value),
                len: value.chars().count(),
            });
        }
        if !value.starts_with(K::PREFIX) {
            return Err(SidError::Prefix {
                name,
                value: value.to_string(),
                prefix: K::PREFIX,
            });
        }
        if !all_hex(&value.as_bytes()[2..]) {
            return Err(SidError::NotHex {
                name,
                value: value.to_string(),
                prefix: K::PREFIX,
            });
        }
        let mut bytes = [0u8; SID_LEN];
        bytes.copy_from_slice(value.as_bytes());
        Ok(Sid {
            bytes,
            kind: PhantomData,
        })
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII was ever copied in.
        std::str::from_utf8(&self.bytes).expect("SIDs are ASCII")
    }
}

/// Keeps error messages readable when someone pastes a whole paragraph into a SID field.
fn shorten(value: &str) -> String {
    if value.chars().count() > 48 {
        let head: String = value.chars().take(45).collect();
        format!("{head}...")
    } else {
        value.to_string()
    }
}

impl<K: SidKind> FromStr for Sid<K> {
    type Err = SidError;
    fn from_str(s: &str) -> Result<Self, SidError> {
        Self::parse(s)
    }
}

impl<K: SidKind> fmt::Display for Sid<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<K: SidKind> fmt::Debug for Sid<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_str())
    }
}

impl<K: SidKind> serde::Serialize for Sid<K> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de, K: SidKind> serde::Deserialize<'de> for Sid<K> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Sid::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "WW0123456789abcdef0123456789abcdef";

    #[test]
    fn workflow_sid_of_34_hex_characters_parses() {
        let sid: WorkflowSid = GOOD.parse().unwrap();
        assert_eq!(sid.as_str(), GOOD);
    }

    #[test]
    fn thirty_three_character_sid_is_refused_with_its_length() {
        let err = WorkflowSid::parse(&GOOD[..33]).unwrap_err();
        assert!(err.to_string().contains("33 characters"), "{err}");
    }

    #[test]
    fn wrong_prefix_is_refused() {
        let err = WorkflowSid::parse(&GOOD.replacen("WW", "WS", 1)).unwrap_err();
        assert!(
            matches!(err, SidError::Prefix { prefix: "WW", .. }),
            "{err}"
        );
    }

    #[test]
    fn placeholder_sid_is_refused_as_not_hex() {
        let err = WorkflowSid::parse("WWxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx").unwrap_err();
        assert!(matches!(err, SidError::NotHex { .. }), "{err}");
    }
}
