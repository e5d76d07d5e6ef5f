//! `sampo testnet`: a local network of real node processes.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use sampo_testnet::{Testnet, TestnetConfig};

#[derive(clap::Args, Debug)]
pub(crate) struct TestnetArgs {
    /// How many nodes.
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Model every node serves (default: the fetched SmolLM2 model, else a synthetic one).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Nodes that return wrong outputs.
    #[arg(long, default_value_t = 0)]
    byzantine: usize,
    /// Nodes that commit but never reveal.
    #[arg(long, default_value_t = 0)]
    absent: usize,
    /// Nodes that, as coordinators, attack others' standing: forged absences, dropped
    /// commits, re-announced attempts, two verdicts for one attempt.
    #[arg(long, default_value_t = 0)]
    byzantine_coordinators: usize,
    /// The byzantine nodes collude: they lie (all the same way) only when together they
    /// hold a committee's quorum, so no outvoted lie gives them away; with --demo, run
    /// tasks until their lie finalizes and watch replay overturn it.
    #[arg(long, requires = "byzantine")]
    collude: bool,
    /// Committee size.
    #[arg(long, default_value_t = 3)]
    k: usize,
    /// Where node dirs go (default: a fresh temporary directory, printed).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Submit a chat prompt with k = 3, print the verified answer, and exit.
    #[arg(long)]
    demo: bool,
    /// The demo's prompt.
    #[arg(long, default_value = "What is the capital of France?")]
    prompt: String,
}

fn default_model(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let models = std::env::var("SAMPO_MODEL_DIR").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("models"));
    let real = models.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if real.exists() {
        return Ok(std::fs::canonicalize(&real).unwrap_or(real));
    }
    eprintln!("the SmolLM2 model is not fetched (scripts/fetch-model.sh); using a synthetic model");
    let p = dir.join("synthetic.gguf");
    let bytes = sampo_kernels::synth::synthesize(&sampo_kernels::synth::SynthSpec::default());
    std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

pub(crate) fn run(args: TestnetArgs) -> anyhow::Result<()> {
    let dir = match args.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("sampo-testnet-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let model = match args.model {
        Some(m) => m,
        None => default_model(&dir)?,
    };
    let sampo = std::env::current_exe().context("locating the sampo binary")?;
    let mut cfg = TestnetConfig::new(args.nodes, model.clone(), dir.clone(), sampo);
    cfg.byzantine = args.byzantine;
    cfg.absent = args.absent;
    cfg.byzantine_coordinators = args.byzantine_coordinators;
    cfg.collude = args.collude;
    cfg.k = args.k;
    println!("testnet: {} nodes in {} serving {}", args.nodes, dir.display(), model.display());
    let mut net = Testnet::start(cfg)?;
    let prom = dir.join("prometheus.yml");
    std::fs::write(&prom, net.prometheus_yml()).with_context(|| format!("writing {}", prom.display()))?;
    println!("{}", net.table());
    println!("prometheus scrape config: {}", prom.display());
    if args.demo && args.collude {
        let result = collusion_demo(&net, &args.prompt, &model, &dir);
        net.stop();
        return result;
    }
    if args.demo {
        println!("\n> {}", args.prompt);
        let v = net.chat(0, &args.prompt, 64, 3)?;
        let answer = v["choices"][0]["message"]["content"].as_str().unwrap_or_default();
        println!("< {answer}\n");
        let s = &v["sampo"];
        println!("verdict:   {} (task {})", s["verdict"].as_str().unwrap_or("?"), s["task_id"].as_str().unwrap_or("?"));
        for m in s["marks"].as_array().into_iter().flatten() {
            let peer = m["peer_id"].as_str().unwrap_or("?");
            let node = net.nodes.iter().find(|n| n.peer_id == peer).map(|n| n.index.to_string()).unwrap_or("?".into());
            println!("  node {node:<3} {peer}  {}", m["mark"].as_str().unwrap_or("?"));
        }
        println!("evidence:  {}{}", net.nodes[0].api_url, s["evidence_url"].as_str().unwrap_or(""));
        net.stop();
        return Ok(());
    }
    println!("running; Ctrl-C stops every node");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    net.stop();
    // Give the OS a moment to reap before the temp dir report.
    std::thread::sleep(Duration::from_millis(100));
    println!("stopped; node dirs kept in {}", dir.display());
    Ok(())
}

/// Run chats until the colluders sit together on a committee and their lie finalizes,
/// then watch every honest node replay it, overturn it and ban them; finish with the
/// offline replay of the saved evidence.
fn collusion_demo(net: &Testnet, prompt: &str, model: &std::path::Path, dir: &std::path::Path) -> anyhow::Result<()> {
    let liars: Vec<&str> = net.nodes.iter().filter(|n| n.role == "colluder").map(|n| n.peer_id.as_str()).collect();
    anyhow::ensure!(liars.len() >= 2, "--collude needs --byzantine 2 or more");
    for round in 1..=40 {
        let v = net.chat(0, &format!("{prompt} ({round})"), 16, 3)?;
        let s = &v["sampo"];
        let marks: Vec<(String, String)> = s["marks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| (m["peer_id"].as_str().unwrap_or("").to_owned(), m["mark"].as_str().unwrap_or("").to_owned()))
            .collect();
        let seated_liars = marks.iter().filter(|(p, m)| liars.contains(&p.as_str()) && m == "agreed").count();
        println!(
            "task {round:>2}: {} — marks {:?}",
            s["verdict"].as_str().unwrap_or("?"),
            marks.iter().map(|m| &m.1).collect::<Vec<_>>()
        );
        if s["verdict"] != "finalized" || seated_liars < 2 {
            continue;
        }
        let task = s["task_id"].as_str().unwrap_or_default().to_owned();
        println!("\nthe colluders' output finalized (task {task}); honest nodes replay it...");
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        for n in net.nodes.iter().filter(|n| n.role == "honest") {
            loop {
                let t = sampo_testnet::get_json(&format!("{}/v1/tasks/{task}", n.api_url)).unwrap_or_default();
                if t["task"]["status"] == "overturned" {
                    println!("  node {}: task overturned {}", n.index, t["overturned"]);
                    break;
                }
                anyhow::ensure!(std::time::Instant::now() < deadline, "node {} did not overturn the task", n.index);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let (_, bundle) = sampo_testnet::http(
            "GET",
            &format!("{}/v1/tasks/{task}/evidence", net.nodes[0].api_url),
            None,
            Duration::from_secs(10),
        )?;
        let file = dir.join("overturned-bundle.json");
        std::fs::write(&file, bundle).with_context(|| format!("writing {}", file.display()))?;
        println!("\n$ sampo verify --replay --model {} {}", model.display(), file.display());
        if let Err(e) = crate::cmd_verify::run(&file, false, Some(model), 1) {
            println!("{e}");
        }
        return Ok(());
    }
    anyhow::bail!("the colluders never sat together on a committee in 40 tasks")
}
