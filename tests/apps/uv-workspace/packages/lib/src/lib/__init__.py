def greeting():
    return "Hello from the lib member"
