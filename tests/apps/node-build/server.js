// An ESM Express app: what its build wrote, and which modules it can import.
import fs from "node:fs";
import express from "express";

const app = express();
app.get("/", (req, res) => res.send(`Hello (ESM) from Node ${process.version}\n`));
app.get("/built", (req, res) => res.send(fs.readFileSync("public/built.txt", "utf8")));
app.get("/import/:module", async (req, res) => {
  try {
    await import(req.params.module);
    res.send("yes\n");
  } catch (error) {
    res.send("no\n");
  }
});
app.listen(Number(process.env.PORT), process.env.BIND_ADDRESS || "127.0.0.1");
