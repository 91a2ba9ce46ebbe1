// An Express app for piku: `git push piku main` installs package-lock.json with `npm ci` and
// runs package.json's start script as the web worker (or the Procfile's web: line, if any).
const express = require("express");

const app = express();
const name = process.env.APP_NAME || "express";

app.get("/", (req, res) => res.send(`Hello from ${name} on Node ${process.version} (${process.env.NODE_ENV})\n`));
app.get("/node", (req, res) => res.send(`${process.version}\n`));
app.get("/import/:module", (req, res) => {
  try {
    require.resolve(req.params.module);
    res.send("yes\n");
  } catch (error) {
    res.send("no\n");
  }
});

// piku gives the worker PORT (and BIND_ADDRESS); nginx, when set up, sends the app's traffic there
app.listen(Number(process.env.PORT) || 3000, process.env.BIND_ADDRESS || "127.0.0.1", () => {
  console.log(`listening on ${process.env.BIND_ADDRESS || "127.0.0.1"}:${process.env.PORT}`);
});
