//! Bad input gets an error naming the field (and, for YAML, the line and column).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use graylane_strategy::{parse_json, parse_yaml, Compiled, Error};

fn compile_err(json: &str) -> Error {
    match parse_json(json.as_bytes()).and_then(Compiled::compile) {
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
    let e = compile_err(r#"{"route-strategy": {"A": {"status": "Y", "percent": {"value": 101}}}}"#);
    assert_eq!(e.path(), "route-strategy.A.percent.value", "{e}");
    let e = compile_err(r#"{"route-strategy": {"A": {"status": "Y", "gray_cookie": true}}}"#);
    assert_eq!(e.path(), "route-strategy.A.gray_cookie", "{e}");
    let e = compile_err(
        r#"{"gray_cookie": {"key": "short"}, "route-strategy": {"A": {"status": "G"}}}"#,
    );
    assert_eq!(e.path(), "gray_cookie.key", "{e}");
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
