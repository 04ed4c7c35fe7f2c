//! Load a report in a real headless browser (Debian's `chromium`) and check that it
//! produced no console messages and that every image resolved. Used by the tests
//! (which fail when no browser is installed; `.ci/run` installs one) and by `vipo report --check`.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What the browser saw.
#[derive(Debug, Clone, PartialEq)]
pub struct BrowserCheck {
    pub images: usize,
    pub broken_images: usize,
    /// Console lines (errors, warnings, logs, uncaught exceptions).
    pub console: Vec<String>,
}

impl BrowserCheck {
    pub fn ok(&self) -> bool {
        self.broken_images == 0 && self.console.is_empty()
    }
}

/// The headless browser to use: `$VIPO_CHROMIUM`, else the first of chromium,
/// chromium-browser, google-chrome on PATH.
pub fn find_browser() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VIPO_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

fn attr(dom: &str, name: &str) -> Option<usize> {
    let key = format!("{name}=\"");
    let i = dom.find(&key)? + key.len();
    dom[i..].split('"').next()?.parse().ok()
}

/// Load `html` in headless `browser`, let it run its load handlers, and report.
pub fn check(browser: &Path, html: &Path) -> Result<BrowserCheck> {
    let abs = std::fs::canonicalize(html).with_context(|| format!("{}: no such report", html.display()))?;
    let profile = tempdir_for_profile()?;
    let mut child = Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("file://{}", abs.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", browser.display()))?;
    // Read both pipes on threads so a chatty browser never blocks on a full pipe.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut so, &mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut se, &mut s);
        s
    });
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&profile);
            bail!("{}: did not finish loading {} within 120 s", browser.display(), html.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let dom = t_out.join().unwrap_or_default();
    let err = t_err.join().unwrap_or_default();
    let _ = std::fs::remove_dir_all(&profile);
    let (Some(images), Some(broken_images)) = (attr(&dom, "data-images"), attr(&dom, "data-broken-images")) else {
        bail!("{}: the page's load handler did not run in {} (no data-images attribute in the DOM); browser stderr:\n{err}", html.display(), browser.display());
    };
    let console = err.lines().filter(|l| l.contains(":CONSOLE") || l.contains("Uncaught")).map(String::from).collect();
    Ok(BrowserCheck { images, broken_images, console })
}

fn tempdir_for_profile() -> Result<PathBuf> {
    let p = std::env::temp_dir().join(format!("vipo-chromium-{}-{}", std::process::id(), Instant::now().elapsed().as_nanos() ^ rand::random::<u64>() as u128));
    std::fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
    Ok(p)
}
