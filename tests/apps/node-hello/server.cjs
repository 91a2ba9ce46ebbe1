// CommonJS: require("express")
const express = require("express");

const app = express();
app.get("/", (req, res) => res.send(`CommonJS hello on Node ${process.version}\n`));
app.get("/modules", (req, res) => res.send(`${require("fs").realpathSync("node_modules")}\n`));
app.listen(Number(process.env.PORT), process.env.BIND_ADDRESS || "127.0.0.1");
