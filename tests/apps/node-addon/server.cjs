// Which Node runs, and which Node's headers the native addon (vendor/hello-addon) was built against.
const http = require("http");
const addon = require("hello-addon");

http.createServer((req, res) => {
  res.end(`running ${process.version}, addon built for ${addon.builtFor()}\n`);
}).listen(Number(process.env.PORT), process.env.BIND_ADDRESS || "127.0.0.1");
