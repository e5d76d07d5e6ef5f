"""One local sampo node (k = 1) for the benchmark scripts: started in a temporary
directory, its API URL read from `data/node.json`, stopped on exit."""
import contextlib, json, os, subprocess, tempfile, time


@contextlib.contextmanager
def local_node(sampo, model, extra_config=""):
    """Yield the API URL of a node serving `model`; `extra_config` is appended to its
    TOML config."""
    with tempfile.TemporaryDirectory() as d:
        cfg = os.path.join(d, "c.toml")
        with open(cfg, "w") as f:
            f.write(f'data_dir = "{d}/data"\n[consensus]\nk = 1\n[network]\nannounce_interval_secs = 1\n'
                    + extra_config)
        node = subprocess.Popen([sampo, "node", "--config", cfg, "--model", model, "--api-listen", "127.0.0.1:0",
                                 "--listen", "/ip4/127.0.0.1/tcp/0"], stderr=subprocess.DEVNULL)
        try:
            info = os.path.join(d, "data", "node.json")
            url = None
            for _ in range(600):
                if os.path.exists(info):
                    try:
                        url = json.load(open(info))["api_url"]
                        break
                    except ValueError:
                        pass
                time.sleep(0.05)
            if url is None:
                raise SystemExit("the node did not start")
            time.sleep(1.5)  # the node announces itself to its own registry
            yield url
        finally:
            node.terminate()
            node.wait()
