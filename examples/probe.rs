use classifier::model::Model;
fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let args: Vec<String> = std::env::args().collect();
    let t = std::time::Instant::now();
    let model = Model::from_bytes(&std::fs::read(&args[1])?)?;
    eprintln!("prepared in {:?}: {:?}", t.elapsed(), model);
    let spec = model.input();
    let mut imgs = vec![];
    for path in &args[2..] {
        imgs.push(classifier::preprocess::prepare(&std::fs::read(path)?, spec.width, spec.height)?);
    }
    let refs: Vec<&[u8]> = imgs.iter().map(|v| &v[..]).collect();
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let scores = model.classify(&refs)?;
        eprintln!("inference of {} {:?}", refs.len(), t.elapsed());
        if std::env::var("SHOW").is_ok() {
            for (path, s) in args[2..].iter().zip(scores) {
                let top = classifier::rank::top_k(&s, 3);
                println!("{path}: {:?}", top.iter().map(|&i| (i, s[i])).collect::<Vec<_>>());
            }
        }
    }
    Ok(())
}
