//! Bad input gets an error naming the field (and, for YAML, the line and column).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use graylane_strategy::{parse_json, parse_yaml, Compiled, Error};

fn compile_err(json: &str) -> Error {
    match parse_json(json.as_bytes()).and_then(Compiled::try_from) {
        Ok(_) => panic!("accepted: {json}"),
        Err(e) => e,
    }
}

#[test]
fn errors_name_the_field() {
    let e = compile_err(r#"{"route-strategy": {"A": {"status": "X"}}}"#);
    assert_eq!(e.path(), "route-strategy.A.status", "{e}");
    let e =
        compile_err(r#"{"route-strategy": {"A": {"status": "Y", "id": {"interval": [[5, 1]]}}}}"#);
    assert_eq!(e.path(), "route-strategy.A.id.interval[0]", "{e}");
    assert!(
        e.to_string().contains("lower bound exceeds the upper"),
        "{e}"
    );
    let e = compile_err(r#"{"route-strategy": {"A": {"status": "Y", "colour": 1}}}"#);
    assert!(e.to_string().contains("unknown field `colour`"), "{e}");
    assert_eq!(e.path(), "route-strategy.A.colour", "{e}");
    let e = compile_err(r#"{"colour": 1, "route-strategy": {"A": {"status": "Y"}}}"#);
    assert_eq!(e.path(), "colour", "{e}");
    let e = compile_err(r#"{"route-strategy": {"A": {"status": "Y", "percent": {"value": 101}}}}"#);
    assert_eq!(e.path(), "route-strategy.A.percent.value", "{e}");
    let e = compile_err(r#"{"route-strategy": {"A": {"status": "Y", "gray_cookie": true}}}"#);
    assert_eq!(e.path(), "route-strategy.A.gray_cookie", "{e}");
    // The HMAC key of earlier versions: refused, saying what to do instead.
    let e = compile_err(
        r#"{"gray_cookie": {"key": "a-shared-secret-0123"}, "route-strategy": {"A": {"status": "G"}}}"#,
    );
    assert_eq!(e.path(), "gray_cookie.key", "{e}");
    for hint in [
        "no longer accepted",
        "graylane keygen",
        "gray_cookie.keys",
        "cookie_keys",
    ] {
        assert!(e.to_string().contains(hint), "{hint}: {e}");
    }
    let e = compile_err(
        r#"{"gray_cookie": {"mode": "signed"}, "route-strategy": {"A": {"status": "G"}}}"#,
    );
    assert_eq!(e.path(), "gray_cookie.keys", "{e}");
    let e = compile_err(
        r#"{"gray_cookie": {"keys": [{"id": "k1", "public_key": "AAAA"}]}, "route-strategy": {"A": {"status": "G"}}}"#,
    );
    assert_eq!(e.path(), "gray_cookie.keys[0].public_key", "{e}");
    let e = compile_err(
        r#"{"gray_cookie": {"keys": [{"id": "k.1", "public_key": "11qYAYKxCrfVS/7TyWQHOg7hcvPaoiMlrwIaaPcHURo="}]}, "route-strategy": {"A": {"status": "G"}}}"#,
    );
    assert_eq!(e.path(), "gray_cookie.keys[0].id", "{e}");
    let e = compile_err(
        r#"{"gray_cookie": {"keys": [{"id": "k1", "public_key": "11qYAYKxCrfVS/7TyWQHOg7hcvPaoiMlrwIaaPcHURo="},
                                     {"id": "k1", "public_key": "11qYAYKxCrfVS/7TyWQHOg7hcvPaoiMlrwIaaPcHURo="}]},
            "route-strategy": {"A": {"status": "G"}}}"#,
    );
    assert_eq!(e.path(), "gray_cookie.keys[1].id", "{e}");
    let e = compile_err(
        r#"{"gray_cookie": {"mode": "plain", "keys": [{"id": "k1", "public_key": "11qYAYKxCrfVS/7TyWQHOg7hcvPaoiMlrwIaaPcHURo="}]},
            "route-strategy": {"A": {"status": "G"}}}"#,
    );
    assert_eq!(e.path(), "gray_cookie.keys", "{e}");
    let e = compile_err(r#"{"route-strategy": {}}"#);
    assert_eq!(e.path(), "route-strategy", "{e}");
    let e = compile_err(r#"{"route-strategy": {"A": {"status": "Y", "id": {"ids": [-4]}}}}"#);
    assert!(e.to_string().contains("negative"), "{e}");
}

#[test]
fn yaml_errors_carry_line_and_column() {
    let yaml = "route-strategy:\n  A:\n    status: Y\n    id:\n      interval: [[10, 1]]\n";
    let e = parse_yaml(yaml).expect_err("bad interval");
    match &e {
        Error::Parse { path, location, .. } => {
            assert_eq!(path, "route-strategy.A.id.interval[0]");
            assert_eq!(location.map(|l| l.0), Some(5), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("line 5"), "{e}");
}

#[test]
fn text_after_the_document_is_an_error() {
    let e = compile_err(r#"{"route-strategy": {"B": {"status": "G"}}} {"x": 1}"#);
    assert!(e.to_string().contains("trailing characters"), "{e}");
    assert!(e.to_string().contains("line 1, column 44"), "{e}");
    // Whitespace after it is fine.
    assert!(parse_json(b"{\"route-strategy\": {\"B\": {\"status\": \"G\"}}} \n").is_ok());
}

/// The reader form (the filter streams its plugin configuration through it) accepts and
/// rejects exactly what the slice form does, with the same field paths and positions.
#[test]
fn reading_in_pieces_parses_like_the_slice() {
    use graylane_strategy::spec::{parse_json_as, parse_json_reader_as, StrategySpec};
    use std::io::Read;
    /// Hands out at most 3 bytes a call, like a host buffer read in small chunks.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(3).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    let docs = [
        r#"{"route-strategy": {"A": {"status": "Y", "id": {"ids": [1, "x7", 3], "interval": [[1, 100]]}}, "B": {"status": "G", "id": {"all": true}}}}"#,
        "{\"route-strategy\": {\"A\": {\n  \"status\": \"X\"}}}",
        r#"{"route-strategy": {"A": {"status": "Y", "id": {"ids": [-4]}}}}"#,
        r#"{"route-strategy": {"B": {"status": "G"}}} trailing"#,
        r#"{"route-strategy": {"#,
    ];
    // Paths and messages agree; a column may differ by one (the reader has looked one byte
    // further when a custom check fails).
    let strip = |r: Result<String, graylane_strategy::Error>| {
        r.map_err(|e| {
            let text = e.to_string();
            let cut = text.find(" (line ").unwrap_or(text.len());
            (e.path().to_string(), text[..cut].to_string())
        })
    };
    for doc in docs {
        let slice = parse_json_as::<StrategySpec>(doc.as_bytes()).map(|s| format!("{s:?}"));
        let read = parse_json_reader_as::<StrategySpec, _>(std::io::BufReader::new(Trickle(
            doc.as_bytes(),
        )))
        .map(|s| format!("{s:?}"));
        assert_eq!(strip(slice), strip(read), "{doc}");
    }
}
