// The front end: bundled by esbuild (a dev dependency) into assets/dist/app.js at build time.
import { greet } from "./greet.js";

document.addEventListener("DOMContentLoaded", () => {
  document.body.insertAdjacentHTML("beforeend", `<p>${greet("piku")}</p>`);
});
