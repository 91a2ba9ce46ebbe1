// The build script: uses a dev dependency (left-pad) that the served environment does not have.
import fs from "node:fs";
import leftPad from "left-pad";

if (process.env.FAIL_BUILD) {
  console.error("the build failed on purpose");
  process.exit(3);
}
fs.mkdirSync("public", { recursive: true });
fs.writeFileSync("public/built.txt", `built with left-pad: ${leftPad("7", 3, "0")}\n`);
console.log("wrote public/built.txt");
