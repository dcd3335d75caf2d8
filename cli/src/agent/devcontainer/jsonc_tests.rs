//! JSON with comments: what VS Code accepts is accepted, strings are left
//! alone, and errors point at the original file's line and column.

use std::path::Path;

use serde_json::json;

use super::jsonc::{parse, to_plain_json};
use super::{plan_from_bytes, DevcontainerError};

#[test]
fn comments_and_trailing_commas_are_accepted() {
    let text = r#"// The project's dev container.
{
    /* the name,
       over two lines */
    "name": "app", // trailing comment
    "forwardPorts": [3000, 8080,],
    "containerEnv": {
        "A": "1",
        /* a comment before the closing brace */
    },
}
"#;
    let value = parse(text).unwrap();
    assert_eq!(
        value,
        json!({"name": "app", "forwardPorts": [3000, 8080], "containerEnv": {"A": "1"}})
    );
}

#[test]
fn comment_markers_and_commas_inside_strings_are_text() {
    let text = r#"{
        "url": "http://example.com/a//b", // a real comment
        "glob": "src/**/*.rs /* not a comment */",
        "list": "a,]",
        "brace": "x,}",
        "escaped": "say \"// hi\", /* there */",
        "slash": "ends with a backslash \\", "after": [1,],
    }"#;
    let value = parse(text).unwrap();
    assert_eq!(value["url"], "http://example.com/a//b");
    assert_eq!(value["glob"], "src/**/*.rs /* not a comment */");
    assert_eq!(value["list"], "a,]");
    assert_eq!(value["brace"], "x,}");
    assert_eq!(value["escaped"], "say \"// hi\", /* there */");
    assert_eq!(value["slash"], "ends with a backslash \\");
    assert_eq!(value["after"], json!([1]));
}

#[test]
fn the_plain_text_keeps_every_byte_position() {
    let text = "\u{feff}{ /* é\n ü */ \"a\": [1, ], // ß\n \"b\": 2, }";
    let plain = to_plain_json(text).unwrap();
    assert_eq!(plain.len(), text.len());
    assert_eq!(
        plain.match_indices('\n').collect::<Vec<_>>(),
        text.match_indices('\n').collect::<Vec<_>>()
    );
    let value: serde_json::Value = serde_json::from_str(&plain).unwrap();
    assert_eq!(value, json!({"a": [1], "b": 2}));
}

#[test]
fn a_missing_comma_is_reported_at_its_line_and_column() {
    // Line 4: two block comments with multi-byte characters stand before
    // the key that lacks its comma; the column counts characters.
    let text = "{\n  // ünïcode comment\n  \"a\": 1\n  /* é */ \"b\": 2\n}\n";
    let err = parse(text).unwrap_err();
    assert_eq!((err.line, err.column), (4, 11), "{err:?}");
    assert_eq!(err.message, "expected `,` or `}`");
}

#[test]
fn an_unclosed_block_comment_is_reported_where_it_starts() {
    let err = parse("{\n  \"a\": 1 /* never\n closed").unwrap_err();
    assert_eq!((err.line, err.column), (2, 10), "{err:?}");
    assert!(err.message.contains("not closed"), "{}", err.message);
}

#[test]
fn the_error_names_the_file_position_and_what_to_do() {
    let text = b"{\n  \"postCreateCommand\": \"npm ci\"\n  \"forwardPorts\": [3000]\n}\n";
    let path = Path::new("/p/.devcontainer/devcontainer.json");
    let err =
        plan_from_bytes(text, ".devcontainer/devcontainer.json", path, "p", "id").unwrap_err();
    assert!(
        matches!(
            err,
            DevcontainerError::Syntax {
                line: 3,
                column: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "/p/.devcontainer/devcontainer.json:3:3: expected `,` or `}`; fix the file or remove it"
    );
}

#[test]
fn bytes_that_are_not_utf8_are_an_error_with_their_position() {
    let path = Path::new("/p/.devcontainer.json");
    let err = plan_from_bytes(
        b"{\n \"a\": \"\xff\"}",
        ".devcontainer.json",
        path,
        "p",
        "id",
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            DevcontainerError::NotUtf8 {
                line: 2,
                column: 8,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("fix the file or remove it"),
        "{err}"
    );
}

#[test]
fn a_top_level_that_is_not_an_object_is_an_error() {
    let path = Path::new("/p/.devcontainer.json");
    for text in ["[]", "\"image\"", "null", "// only a comment\n3"] {
        let err =
            plan_from_bytes(text.as_bytes(), ".devcontainer.json", path, "p", "id").unwrap_err();
        assert!(
            matches!(err, DevcontainerError::NotAnObject { .. }),
            "{text}: {err:?}"
        );
    }
    let err = plan_from_bytes(b"", ".devcontainer.json", path, "p", "id").unwrap_err();
    assert!(matches!(err, DevcontainerError::Syntax { .. }), "{err:?}");
}
