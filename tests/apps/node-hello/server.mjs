// ESM: import express from "express"
import fs from "node:fs";
import express from "express";

const app = express();
app.get("/", (req, res) => res.send(`ESM hello on Node ${process.version}\n`));
app.get("/modules", (req, res) => res.send(`${fs.realpathSync("node_modules")}\n`));
app.listen(Number(process.env.PORT), process.env.BIND_ADDRESS || "127.0.0.1");
