fn main() -> std::process::ExitCode {
    command_poller::cli::main()
}
