//! The git commit the binary was built from, for `optout --version` and `optout_build_info`:
//! `OPTOUT_GIT_COMMIT` when set (an image built without the .git directory passes it as a build
//! argument), else `git rev-parse`, else "unknown".

fn main() {
    println!("cargo::rerun-if-env-changed=OPTOUT_GIT_COMMIT");
    // A new commit or checkout moves HEAD's log; the build then asks git again.
    println!("cargo::rerun-if-changed=.git/HEAD");
    println!("cargo::rerun-if-changed=.git/logs/HEAD");
    let commit = std::env::var("OPTOUT_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let out = std::process::Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            let text = String::from_utf8(out.stdout).ok()?;
            (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo::rustc-env=OPTOUT_GIT_COMMIT={commit}");
}
