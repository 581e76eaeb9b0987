//! stagerd library: config, reactors, NVMe-oF front end.
