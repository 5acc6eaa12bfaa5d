fn main() {
    eprintln!("publisher: not built yet");
    std::process::exit(1);
}
