//! The `optout` binary: see `optout --help`.

fn main() -> std::process::ExitCode {
    optout::cli::main()
}
