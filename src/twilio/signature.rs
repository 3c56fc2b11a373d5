//! `X-Twilio-Signature`, as Twilio computes it for the requests it makes (SPEC §2b): HMAC-SHA1
//! with the account's auth token over the full URL Twilio called, followed, for a form body, by
//! each parameter's name and value in name order; base64. A JSON body is covered instead by the
//! `bodySHA256` query parameter (hex SHA-256 of the body), which the URL signature includes.

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// Why a pushed request's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no X-Twilio-Signature header")]
    Missing,
    #[error("X-Twilio-Signature does not match this CBO's auth token and {0}")]
    Mismatch(String),
    #[error("the URL has no bodySHA256 parameter, which a JSON body needs")]
    NoBodyHash,
    #[error("bodySHA256 is not the SHA-256 of the body")]
    BodyHash,
}

/// The signature Twilio sends for a request to `url` with form `params`.
pub fn sign(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    // Name order, and for a name given twice, value order (Twilio's helper libraries do the same).
    sorted.sort();
    let mut mac = Hmac::<Sha1>::new_from_slice(auth_token.as_bytes()).expect("any key length");
    mac.update(url.as_bytes());
    for (k, v) in sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Compares in constant time.
fn same(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Checks a form-encoded request. Twilio signs the URL as it called it; behind a proxy that
/// URL may or may not carry a port, so both spellings are tried (as Twilio's own helpers do).
pub fn verify_form(
    auth_token: &str,
    url: &str,
    params: &[(String, String)],
    header: Option<&str>,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let ok = url_spellings(url)
        .iter()
        .any(|u| same(&sign(auth_token, u, params), header));
    ok.then_some(())
        .ok_or_else(|| SignatureError::Mismatch(format!("the URL {url} with its form parameters")))
}

/// Checks a JSON request: the signature covers the URL (with its `bodySHA256` parameter) and
/// no form parameters; `bodySHA256` must be the body's SHA-256.
pub fn verify_json(
    auth_token: &str,
    url: &str,
    body: &[u8],
    header: Option<&str>,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    if !url_spellings(url)
        .iter()
        .any(|u| same(&sign(auth_token, u, &[]), header))
    {
        return Err(SignatureError::Mismatch(format!("the URL {url}")));
    }
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let claimed = serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .unwrap_or_default()
        .into_iter()
        .find(|(k, _)| k == "bodySHA256")
        .map(|(_, v)| v)
        .ok_or(SignatureError::NoBodyHash)?;
    let actual = hex::encode(Sha256::digest(body));
    same(&claimed.to_ascii_lowercase(), &actual)
        .then_some(())
        .ok_or(SignatureError::BodyHash)
}

/// The URL as given, and with the scheme's default port added or removed.
fn url_spellings(url: &str) -> Vec<String> {
    let mut out = vec![url.to_string()];
    for (scheme, port) in [("https://", ":443"), ("http://", ":80")] {
        let Some(rest) = url.strip_prefix(scheme) else {
            continue;
        };
        let host_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (host, tail) = rest.split_at(host_end);
        match host.strip_suffix(port) {
            Some(bare) => out.push(format!("{scheme}{bare}{tail}")),
            None if !host.contains(':') => out.push(format!("{scheme}{host}{port}{tail}")),
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Vec<(String, String)> {
        [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    const URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";

    #[test]
    fn twilios_published_example() {
        assert_eq!(
            sign("12345", URL, &example()),
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        );
        let mut shuffled = example();
        shuffled.reverse();
        assert_eq!(
            verify_form(
                "12345",
                URL,
                &shuffled,
                Some("0/KCTR6DLpKmkAf8muzZqo1nDgQ=")
            ),
            Ok(())
        );
        // The same request behind a proxy that spells the port.
        assert_eq!(
            verify_form(
                "12345",
                "https://mycompany.com:443/myapp.php?foo=1&bar=2",
                &example(),
                Some("0/KCTR6DLpKmkAf8muzZqo1nDgQ=")
            ),
            Ok(())
        );
    }

    #[test]
    fn a_changed_parameter_another_token_or_no_header_is_refused() {
        let good = "0/KCTR6DLpKmkAf8muzZqo1nDgQ=";
        let mut changed = example();
        changed[2].1 = "9999".into();
        assert!(matches!(
            verify_form("12345", URL, &changed, Some(good)),
            Err(SignatureError::Mismatch(_))
        ));
        assert!(verify_form("54321", URL, &example(), Some(good)).is_err());
        assert_eq!(
            verify_form("12345", URL, &example(), None),
            Err(SignatureError::Missing)
        );
    }

    #[test]
    fn json_bodies_are_covered_by_body_sha256() {
        let body = br#"[{"type":"com.twilio.taskrouter.task.created"}]"#;
        let hash = hex::encode(Sha256::digest(body));
        let url =
            format!("https://guard.example.org/v1/twilio/nss/event-streams?bodySHA256={hash}");
        let header = sign("tok", &url, &[]);
        assert_eq!(verify_json("tok", &url, body, Some(&header)), Ok(()));
        assert_eq!(
            verify_json("tok", &url, b"[]", Some(&header)),
            Err(SignatureError::BodyHash)
        );
        let bare = "https://guard.example.org/v1/twilio/nss/event-streams";
        assert_eq!(
            verify_json("tok", bare, body, Some(&sign("tok", bare, &[]))),
            Err(SignatureError::NoBodyHash)
        );
    }
}
