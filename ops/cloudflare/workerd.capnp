# workerd config: runs worker.js locally the way Cloudflare runs it (the tests drive it this way).
#
#   ORIGIN=http://127.0.0.1:8000 node_modules/.bin/workerd serve workerd.capnp --socket-addr http=127.0.0.1:8787
#
# ORIGIN is read from the environment when workerd starts; --socket-addr overrides the listen address.
using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [
    (name = "relay", worker = .relay),
    # The Worker's fetch() goes to the "internet" service, which by default refuses private and loopback
    # addresses (SSRF protection). A gateway on localhost or a private network needs them allowed.
    (name = "internet", network = (allow = ["public", "private", "local"])),
  ],
  sockets = [(name = "http", address = "127.0.0.1:8787", http = (), service = "relay")],
);

const relay :Workerd.Worker = (
  modules = [(name = "worker.js", esModule = embed "worker.js")],
  compatibilityDate = "2025-06-01",
  compatibilityFlags = ["enable_request_signal"],
  bindings = [(name = "ORIGIN", fromEnvironment = "ORIGIN")],
);
