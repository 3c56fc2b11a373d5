//! What went wrong with a request, in a few words: the one cause an operator can act on
//! ("connection refused", "timed out", "dns error: …"), not reqwest's chain of wrappers.

use std::error::Error;

/// The cause of a failed request, said once: `connection refused`, `timed out`, or the
/// innermost error's message.
pub fn cause(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    let Some(mut root) = e.source() else {
        // No inner cause: reqwest's own words, without the URL (the caller names it).
        let text = e.to_string();
        return match e.url() {
            Some(url) => text.replace(&format!(" for url ({url})"), ""),
            None => text,
        };
    };
    while let Some(next) = root.source() {
        root = next;
    }
    if let Some(io) = root.downcast_ref::<std::io::Error>() {
        use std::io::ErrorKind::*;
        let said = match io.kind() {
            ConnectionRefused => Some("connection refused"),
            ConnectionReset => Some("connection reset"),
            ConnectionAborted => Some("connection aborted"),
            TimedOut => Some("timed out"),
            AddrNotAvailable => Some("address not available"),
            HostUnreachable => Some("host unreachable"),
            NetworkUnreachable => Some("network unreachable"),
            UnexpectedEof => Some("the connection closed before the answer"),
            _ => None,
        };
        if let Some(said) = said {
            return said.into();
        }
    }
    root.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_connection_is_said_in_two_words() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Nothing listens on the port any more.
        let e = reqwest::get(format!("http://127.0.0.1:{port}/"))
            .await
            .unwrap_err();
        assert_eq!(cause(&e), "connection refused");
    }

    #[tokio::test]
    async fn a_timeout_is_said_as_such() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts and never answers.
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                held.push(listener.accept().await.unwrap());
            }
        });
        let e = reqwest::Client::new()
            .get(format!("http://{addr}/"))
            .timeout(std::time::Duration::from_millis(100))
            .send()
            .await
            .unwrap_err();
        assert_eq!(cause(&e), "timed out");
    }

    #[tokio::test]
    async fn a_connection_closed_before_the_answer_is_named() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                drop(s);
            }
        });
        let e = reqwest::get(format!("http://{addr}/")).await.unwrap_err();
        let said = cause(&e);
        assert!(!said.contains("error sending request"), "{said}");
        assert!(!said.contains(&addr.to_string()), "{said}");
    }
}
