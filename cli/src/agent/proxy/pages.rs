//! The pages the proxy answers itself: "sandbox not running" (503), no
//! such sandbox or port (404, listing the running sandboxes' URLs), the
//! guest port cannot be reached (502) and too many connections (503).
//!
//! Every text that comes from the registry, the request or the guest is
//! HTML-escaped ([`escape`]) and shortened ([`MAX_SHOWN`]); the pages that
//! wait for something (a stopped sandbox, a server not listening yet)
//! reload themselves every 5 seconds.

use super::routing::url;

/// The most characters of one outside text a page shows.
pub const MAX_SHOWN: usize = 200;
/// How often a waiting page reloads, in seconds.
pub const RELOAD_SECONDS: u32 = 5;

/// Escapes text for HTML content and attribute values, shortened to
/// [`MAX_SHOWN`] characters; control characters become U+FFFD.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_SHOWN) + 16);
    for (i, c) in text.chars().enumerate() {
        if i == MAX_SHOWN {
            out.push('…');
            break;
        }
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// A page: its HTTP status, whether it reloads itself, and its HTML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub status: u16,
    pub reloads: bool,
    pub html: String,
}

fn document(title: &str, reloads: bool, body: &str) -> String {
    let refresh = if reloads {
        format!("<meta http-equiv=\"refresh\" content=\"{RELOAD_SECONDS}\">")
    } else {
        String::new()
    };
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">{refresh}\
         <title>{title}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:44em;margin:4em auto;\
         padding:0 1em;color:#222}}code{{background:#eee;padding:.1em .3em}}\
         li{{margin:.2em 0}}</style>\
         </head><body>\n{body}</body></html>\n"
    )
}

/// The running sandboxes and their URLs, as a list (or a line saying
/// there are none).
fn listing_html(listing: &[(String, Vec<String>)]) -> String {
    if listing.is_empty() {
        return "<p>No sandbox is running. Start one with <code>keystone agent start</code>.</p>\n"
            .into();
    }
    let mut html = String::from("<p>Running sandboxes:</p>\n<ul>\n");
    for (name, urls) in listing {
        html.push_str(&format!("<li><code>{}</code>:", escape(name)));
        for u in urls {
            let u = escape(u);
            html.push_str(&format!(" <a href=\"{u}\">{u}</a>"));
        }
        html.push_str("</li>\n");
    }
    html.push_str("</ul>\n");
    html
}

/// A registered sandbox that is stopped.
pub fn not_running(sandbox: &str) -> Page {
    let name = escape(sandbox);
    let body = format!(
        "<h1>Sandbox <code>{name}</code> is not running</h1>\n\
         <p>This address reaches a server in the Keystone sandbox <code>{name}</code>, \
         which is stopped.</p>\n\
         <p>Start it with <code>keystone agent start {name}</code> and start the server \
         in it again; this page reloads every {RELOAD_SECONDS} seconds.</p>\n"
    );
    Page {
        status: 503,
        reloads: true,
        html: document(&format!("Sandbox {name} is not running"), true, &body),
    }
}

/// No sandbox by that name (`asked`: the name as the request gave it),
/// or no name at all.
pub fn unknown(asked: Option<&str>, listing: &[(String, Vec<String>)], proxy_port: u16) -> Page {
    let headline = match asked {
        Some(a) => format!("No sandbox at <code>{}</code>", escape(a)),
        None => "Keystone sandboxes".to_string(),
    };
    let body = format!(
        "<h1>{headline}</h1>\n\
         <p>A server in sandbox <code>NAME</code> is at \
         <code>{}</code> (guest port <code>PORT</code>), its primary server at \
         <code>{}</code>.</p>\n{}",
        escape(&url("NAME", None, proxy_port).replace("//NAME.", "//PORT.NAME.")),
        escape(&url("NAME", None, proxy_port)),
        listing_html(listing)
    );
    Page {
        status: 404,
        reloads: false,
        html: document("No such sandbox", false, &body),
    }
}

/// A running sandbox where nothing routable listens at `port` (`None`: no
/// server listens at all yet).
pub fn not_listening(sandbox: &str, port: Option<u16>, listing: &[(String, Vec<String>)]) -> Page {
    let name = escape(sandbox);
    let what = match port {
        Some(p) => format!("Nothing in sandbox <code>{name}</code> listens on port {p}"),
        None => format!("No server listens in sandbox <code>{name}</code> yet"),
    };
    let body = format!(
        "<h1>{what}</h1>\n\
         <p>Servers on the guest's 127.0.0.1, ::1 or all addresses, on port 1024 or \
         above, are reached here within a second or two of listening; this page \
         reloads every {RELOAD_SECONDS} seconds.</p>\n{}",
        listing_html(listing)
    );
    Page {
        status: 404,
        reloads: true,
        html: document("Not listening", true, &body),
    }
}

/// The guest port could not be reached (`why`: the agent's or the
/// connection's words).
pub fn unreachable(sandbox: &str, port: u16, why: &str) -> Page {
    let body = format!(
        "<h1>Cannot reach port {port} in sandbox <code>{}</code></h1>\n<p>{}</p>\n",
        escape(sandbox),
        escape(why)
    );
    Page {
        status: 502,
        reloads: false,
        html: document("Bad gateway", false, &body),
    }
}

/// Too many connections to a sandbox at once.
pub fn busy(sandbox: &str) -> Page {
    let body = format!(
        "<h1>Too many connections to sandbox <code>{}</code></h1>\n\
         <p>Close some tabs or connections and reload.</p>\n",
        escape(sandbox)
    );
    Page {
        status: 503,
        reloads: false,
        html: document("Too many connections", false, &body),
    }
}

/// A method the proxy does not take (CONNECT: it is no forward proxy).
pub fn not_allowed() -> Page {
    let body = "<h1>Method not allowed</h1>\n\
                <p>This is the Keystone dev-server proxy, not a forward proxy.</p>\n";
    Page {
        status: 405,
        reloads: false,
        html: document("Method not allowed", false, body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_text_is_escaped_and_bounded() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(escape("a\u{1b}[31mb\r\n"), "a\u{fffd}[31mb\u{fffd}\u{fffd}");
        let long = "x".repeat(10_000);
        assert_eq!(escape(&long).chars().count(), MAX_SHOWN + 1);
    }

    #[test]
    fn the_not_running_page_names_the_sandbox_and_the_command() {
        let p = not_running("my-app");
        assert_eq!(p.status, 503);
        assert!(p.reloads);
        assert!(p
            .html
            .contains("Sandbox <code>my-app</code> is not running"));
        assert!(p.html.contains("keystone agent start my-app"));
        assert!(p
            .html
            .contains("<meta http-equiv=\"refresh\" content=\"5\">"));
        // A name from a hand-edited registry cannot add markup.
        let p = not_running("x<script>alert(1)</script>");
        assert!(!p.html.contains("<script>"), "{}", p.html);
        assert!(p.html.contains("x&lt;script&gt;"));
    }

    #[test]
    fn the_404_page_lists_running_sandboxes_escaped() {
        let listing = vec![(
            "web\"><img src=x>".to_string(),
            vec!["http://web.localhost:7300/\"onmouseover=\"x".to_string()],
        )];
        let p = unknown(Some("nope<b>.localhost"), &listing, 7300);
        assert_eq!(p.status, 404);
        assert!(!p.reloads);
        assert!(p
            .html
            .contains("No sandbox at <code>nope&lt;b&gt;.localhost</code>"));
        assert!(!p.html.contains("<img"), "{}", p.html);
        assert!(!p.html.contains("\"onmouseover"), "{}", p.html);
        assert!(
            p.html.contains("http://PORT.NAME.localhost:7300/"),
            "{}",
            p.html
        );
        let p = unknown(None, &[], 80);
        assert!(p.html.contains("No sandbox is running"));
        assert!(p.html.contains("http://NAME.localhost/"), "{}", p.html);
    }

    #[test]
    fn guest_words_are_escaped_on_the_502_page() {
        let p = unreachable("web", 3000, "refused: <iframe src=//evil>");
        assert_eq!(p.status, 502);
        assert!(!p.html.contains("<iframe"), "{}", p.html);
        assert!(p.html.contains("&lt;iframe"));
        let p = not_listening("web", Some(8000), &[]);
        assert!(p.reloads && p.status == 404);
        assert!(p.html.contains("listens on port 8000"));
    }
}
