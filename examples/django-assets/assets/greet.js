export function greet(name) {
  return `Hello from the bundle, ${name}`;
}
