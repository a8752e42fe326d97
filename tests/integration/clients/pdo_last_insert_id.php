<?php
// PHP PDO (pdo_pgsql): lastInsertId() without a sequence name runs `SELECT LASTVAL()`, with one
// `SELECT CURRVAL($1)`, each as a statement of its own. Autocommitted, that is a transaction of its own;
// inside beginTransaction() it runs in the INSERT's transaction. Connection from PDO_DSN, PDO_USER,
// PDO_PASSWORD; PDO_SEQUENCE names the sequence. Prints one JSON object per step: whether the id read
// back is the one nextval() gave this client, or the SQLSTATE of the error.
$pdo = new PDO(getenv('PDO_DSN'), getenv('PDO_USER'), getenv('PDO_PASSWORD'), [
    PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION,
]);
$sequence = getenv('PDO_SEQUENCE');

function step(string $name, callable $read, string $mine): void {
    try {
        echo json_encode([$name => $read() === $mine]), "\n";
    } catch (PDOException $error) {
        echo json_encode([$name => $error->getCode()]), "\n";
    }
}

$mine = (string) $pdo->query("SELECT nextval('$sequence')")->fetchColumn();
step('autocommit lastInsertId()', fn() => $pdo->lastInsertId(), $mine);
step('autocommit lastInsertId(sequence)', fn() => $pdo->lastInsertId($sequence), $mine);
$pdo->beginTransaction();
$mine = (string) $pdo->query("SELECT nextval('$sequence')")->fetchColumn();
step('in a transaction lastInsertId()', fn() => $pdo->lastInsertId(), $mine);
step('in a transaction lastInsertId(sequence)', fn() => $pdo->lastInsertId($sequence), $mine);
$pdo->commit();
