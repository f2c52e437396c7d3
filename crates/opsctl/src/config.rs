//! Where `opsctl` finds its server and token: flags, then the environment
//! (`OPSCTL_SERVER`, `OPSCTL_TOKEN`), then the config file (`$OPSCTL_CONFIG`, else
//! `~/.config/opsctl/config.json`), then the default server without a token.
//!
//! A config file that holds a token must be readable by its owner alone (mode 0600), as
//! ssh insists for a private key: a token is an operator's identity.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::Global;
use crate::Error;

/// The server when nothing names one: ops-meta on this machine, on the port of the sample
/// `cfg.json` (`"listen": "0.0.0.0:2000"`).
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:2000";

/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// What every request is made with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: String,
    pub token: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub timeout: Duration,
}

/// The config file, `{"server": "...", "token": "..."}`; both optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: Option<String>,
    #[serde(default)]
    token: Option<String>,
}

/// Resolves the settings from the flags, `env` (the process environment, or a test's)
/// and the config file.
pub fn resolve(g: &Global, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, Error> {
    let env = |k: &str| env(k).filter(|v| !v.is_empty());
    let mut server = g.server.clone().or_else(|| env("OPSCTL_SERVER"));
    let mut token = g.token.clone().or_else(|| env("OPSCTL_TOKEN"));
    if server.is_none() || token.is_none() {
        let (path, named) = match env("OPSCTL_CONFIG") {
            Some(p) => (Some(PathBuf::from(p)), true),
            None => (default_path(&env), false),
        };
        if let Some(path) = path {
            if let Some(f) = read_file(&path, named)? {
                server = server.or(f.server.filter(|s| !s.is_empty()));
                token = token.or(f.token.filter(|t| !t.is_empty()));
            }
        }
    }
    if g.timeout == 0 {
        return Err(Error::Usage("--timeout: must be at least 1 second".into()));
    }
    let server = server.unwrap_or_else(|| DEFAULT_SERVER.into());
    check_server(&server)?;
    if let Some(t) = &token {
        if t.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(Error::Usage(
                "the token holds spaces or characters that cannot go into a header".into(),
            ));
        }
    }
    Ok(Settings {
        server: server.trim_end_matches('/').to_string(),
        token,
        tls_ca: g.tls_ca.clone(),
        timeout: Duration::from_secs(g.timeout),
    })
}

/// `$XDG_CONFIG_HOME/opsctl/config.json`, else `~/.config/opsctl/config.json`.
fn default_path(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let base = env("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| Path::new(&h).join(".config")))?;
    Some(base.join("opsctl").join("config.json"))
}

/// The config file, `None` when the default one does not exist. A file named by
/// `OPSCTL_CONFIG` must exist.
fn read_file(path: &Path, named: bool) -> Result<Option<FileConfig>, Error> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => return Ok(None),
        Err(e) => return Err(Error::Other(format!("config file {}: {e}", path.display()))),
    };
    let meta = f
        .metadata()
        .map_err(|e| Error::Other(format!("config file {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(Error::Other(format!(
            "config file {}: not a regular file",
            path.display()
        )));
    }
    let mut text = String::new();
    f.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::Other(format!("config file {}: {e}", path.display())))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(Error::Other(format!(
            "config file {}: larger than {MAX_CONFIG_BYTES} bytes",
            path.display()
        )));
    }
    let cfg: FileConfig = serde_json::from_str(&text)
        .map_err(|e| Error::Other(format!("config file {}: {e}", path.display())))?;
    let mode = meta.permissions().mode() & 0o777;
    if cfg.token.as_deref().is_some_and(|t| !t.is_empty()) && mode & 0o077 != 0 {
        return Err(Error::Other(format!(
            "config file {} holds a token but is open to others (mode {mode:04o}): run chmod 600 {}",
            path.display(),
            path.display()
        )));
    }
    Ok(Some(cfg))
}

fn check_server(server: &str) -> Result<(), Error> {
    let bad = |why: &str| Error::Usage(format!("server {server:?}: {why}"));
    let url = reqwest::Url::parse(server).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("not an http:// or https:// URL"));
    }
    if url.host_str().is_none() {
        return Err(bad("no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("credentials go in the token, not the URL"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("a base URL has no query or fragment"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    fn resolve_with(g: &Global, vars: &[(&str, &str)]) -> Result<Settings, Error> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        resolve(g, &|k| vars.get(k).cloned())
    }

    fn global() -> Global {
        Global {
            timeout: 30,
            ..Global::default()
        }
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.json");
        std::fs::write(&cfg, r#"{"server": "http://file:1", "token": "ft"}"#).unwrap();
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = cfg.to_str().unwrap();

        let s = resolve_with(&global(), &[("OPSCTL_CONFIG", c)]).unwrap();
        assert_eq!(
            (s.server.as_str(), s.token.as_deref()),
            ("http://file:1", Some("ft"))
        );

        let s = resolve_with(
            &global(),
            &[
                ("OPSCTL_CONFIG", c),
                ("OPSCTL_SERVER", "http://env:2/"),
                ("OPSCTL_TOKEN", "et"),
            ],
        )
        .unwrap();
        assert_eq!(
            (s.server.as_str(), s.token.as_deref()),
            ("http://env:2", Some("et"))
        );

        let g = Global {
            server: Some("https://flag:3".into()),
            token: Some("flagt".into()),
            ..global()
        };
        let s = resolve_with(&g, &[("OPSCTL_CONFIG", c), ("OPSCTL_TOKEN", "et")]).unwrap();
        assert_eq!(
            (s.server.as_str(), s.token.as_deref()),
            ("https://flag:3", Some("flagt"))
        );
    }

    #[test]
    fn nothing_configured_is_the_local_server_without_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap();
        let s = resolve_with(&global(), &[("HOME", home)]).unwrap();
        assert_eq!(s.server, DEFAULT_SERVER);
        assert_eq!(s.token, None);
        // The default file is read when it exists.
        let p = dir.path().join(".config/opsctl/config.json");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, r#"{"server": "http://h:9"}"#).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let s = resolve_with(&global(), &[("HOME", home)]).unwrap();
        assert_eq!(
            s.server, "http://h:9",
            "a file without a token may be readable"
        );
    }

    #[test]
    fn a_token_in_a_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.json");
        std::fs::write(&cfg, r#"{"token": "secret-token"}"#).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = resolve_with(&global(), &[("OPSCTL_CONFIG", cfg.to_str().unwrap())])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("open to others") && e.contains("chmod 600"),
                "{mode:o}: {e}"
            );
            assert!(!e.contains("secret-token"), "{e}");
        }
    }

    #[test]
    fn bad_files_and_servers_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.json");
        let c = cfg.to_str().unwrap();
        let e = resolve_with(&global(), &[("OPSCTL_CONFIG", c)]).unwrap_err();
        assert!(e.to_string().contains("c.json"), "{e}");
        std::fs::write(&cfg, r#"{"server": "http://a:1", "tokn": "x"}"#).unwrap();
        let e = resolve_with(&global(), &[("OPSCTL_CONFIG", c)]).unwrap_err();
        assert!(e.to_string().contains("tokn"), "{e}");
        for bad in ["ftp://a", "not a url", "http://u:p@a:1", "http://a:1/?x=1"] {
            let e = resolve_with(
                &global(),
                &[("OPSCTL_SERVER", bad), ("HOME", "/nonexistent")],
            )
            .unwrap_err();
            assert_eq!(e.exit_code(), crate::exit::USAGE, "{bad}: {e}");
        }
    }
}
